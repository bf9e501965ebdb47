"""Serve converted checkpoints with vLLM; run by the vLLM environment's python (scripts/envs/40-vllm.sh).

    .venv-vllm/bin/python tests/vllm_driver.py SPEC.json OUT.json

SPEC: {"max_tokens": 8, "max_model_len": 256, "startup_timeout": s, "request_timeout": s,
       "cases": [{"name", "model": converted dir, "prompt": chat-template text, "question",
                  "images": {name: PNG path}[, "paths": ["llm", "server"] (the default)]}]}

For each case, twice, greedy (temperature 0, EOS ignored so that every run yields `max_tokens` ids):
  - offline: `LLM(model).generate({"prompt": prompt, "multi_modal_data": {"image": image}})` per image;
  - server: `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 (a free port), each image sent to
    /v1/chat/completions as a data: URL with the question, the server rendering the chat template itself.
OUT: {case: {"llm" | "server": {image: {"prompt_ids", "tokens"[, "prompt_text"]}} or {"error": text}}}.
Each engine start costs seconds of imports and warm-up, so one process runs every case; a failing case
records its error and the others still run. At most two servers run at once (the next one starts while the
previous one answers); each is killed with its process group when done, and every one on exit or SIGTERM.
"""

from __future__ import annotations

import base64
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

# The offline engine runs in this process (no engine-core subprocess to start and import vLLM again).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tiny models need little
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def engine_args(spec: dict) -> dict:
    return {
        "dtype": "float32",
        "enforce_eager": True,  # no torch.compile: minutes on 2 cores, and the same math
        "max_model_len": spec["max_model_len"],
        "limit_mm_per_prompt": {"image": 1},
        "seed": 0,
    }


def run_offline(case: dict, spec: dict) -> dict:
    from PIL import Image
    from vllm import LLM, SamplingParams

    llm = LLM(model=case["model"], **engine_args(spec))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
        names = list(case["images"])
        requests = [
            {"prompt": case["prompt"], "multi_modal_data": {"image": Image.open(case["images"][n]).convert("RGB")}}
            for n in names
        ]
        outputs = llm.generate(requests, params, use_tqdm=False)
        return {
            n: {"prompt_ids": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids)}
            for n, o in zip(names, outputs, strict=True)
        }
    finally:
        shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if shutdown is not None and hasattr(shutdown, "shutdown"):
            shutdown.shutdown()
        del llm
        gc.collect()


_PORTS: set[int] = set()


def free_port() -> int:
    """A free port on 127.0.0.1, never one handed out before (two servers may be starting at once)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS:
            _PORTS.add(port)
            return port


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"HTTP {e.code} from {url}: {e.read().decode(errors='replace')[:2000]}") from None


class Server:
    """`python -m vllm.entrypoints.openai.api_server` for one case, in its own process group."""

    def __init__(self, case: dict, spec: dict, workdir: Path):
        self.case, self.spec = case, spec
        self.base = f"http://127.0.0.1:{free_port()}"
        args = engine_args(spec)
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", case["model"],
            "--host", "127.0.0.1", "--port", self.base.rsplit(":", 1)[1], "--dtype", args["dtype"],
            "--enforce-eager", "--max-model-len", str(args["max_model_len"]),
            "--limit-mm-per-prompt", json.dumps(args["limit_mm_per_prompt"]), "--seed", str(args["seed"]),
            # The model runs in the engine-core process, not in a third one: one vLLM import less. (On CPU,
            # vLLM keeps this executor only with VLLM_ENABLE_V1_MULTIPROCESSING=0, set above; the server's
            # engine core is a separate process whatever that variable says.)
            "--distributed-executor-backend", "uni",
        ]
        self.log = workdir / f"server-{case['name']}.log"
        self.deadline = time.monotonic() + spec["startup_timeout"]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self) -> None:
        while time.monotonic() < self.deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"server not ready in {self.spec['startup_timeout']}s:\n{self._log_tail()}")

    def chat(self) -> dict:
        with urllib.request.urlopen(self.base + "/v1/models", timeout=30) as r:
            model = json.loads(r.read())["data"][0]["id"]
        results = {}
        for name, path in self.case["images"].items():
            url = "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()
            body = {
                "model": model,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": self.case["question"]},
                ]}],
                "temperature": 0.0,
                "max_tokens": self.spec["max_tokens"],
                "ignore_eos": True,
                "return_token_ids": True,
                "return_prompt_text": True,
            }
            resp = _post(self.base + "/v1/chat/completions", body, self.spec["request_timeout"])
            results[name] = {
                "prompt_ids": resp["prompt_token_ids"],
                "tokens": resp["choices"][0]["token_ids"],
                "prompt_text": resp.get("prompt_text"),
            }
        return results

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:  # the engine core and anything else left in the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=20)


def _record(result: dict, out_path: Path, case: str, path: str, run, t0: float) -> None:
    try:
        result[case][path] = run()
    except Exception:  # noqa: BLE001 - recorded for the test to report; the other cases still run
        result[case][path] = {"error": traceback.format_exc()[-4000:]}
    seconds = time.monotonic() - t0
    result["_seconds"][f"{case}/{path}"] = round(seconds, 1)
    print(f"{case} {path}: {seconds:.1f}s", file=sys.stderr, flush=True)
    out_path.write_text(json.dumps(result, indent=1))


def main(argv: list[str]) -> int:
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    # On SIGTERM (the test's timeout) unwind, so that the finally below stops every server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = out_path.parent
    cases = spec["cases"]
    result: dict = {"_seconds": {}, **{c["name"]: {} for c in cases}}
    served = [c for c in cases if "server" in c.get("paths", ["llm", "server"])]
    # A server start is mostly single-threaded imports (in the server and again in its engine-core process):
    # the next server starts while this process runs the offline engines or queries the previous server.
    servers: dict[str, Server] = {}
    t_start: dict[str, float] = {}

    def start(i: int) -> None:
        if i < len(served):
            t_start[served[i]["name"]] = time.monotonic()
            servers[served[i]["name"]] = Server(served[i], spec, workdir)

    try:
        start(0)
        for case in cases:
            if "llm" in case.get("paths", ["llm", "server"]):
                _record(result, out_path, case["name"], "llm", lambda c=case: run_offline(c, spec), time.monotonic())
        for i, case in enumerate(served):
            start(i + 1)
            server = servers[case["name"]]

            def query(server=server):
                try:
                    server.wait_ready()
                    return server.chat()
                finally:
                    server.stop()

            _record(result, out_path, case["name"], "server", query, t_start[case["name"]])
    finally:
        for server in servers.values():
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
