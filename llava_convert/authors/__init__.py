"""The authors' behaviour (haotian-liu/LLaVA 1.2.2): conversation templates, tokenizer quirks, image
preprocessing and the config fold, in one place for both the converter and `check`'s reference side."""
