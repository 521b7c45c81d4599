"""The preset model specs (TOML) that ship with llmgen, importable as llmgen.presets."""
