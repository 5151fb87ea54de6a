"""A config file for tests that run `jaxcond train` as a subprocess on a config built in
Python: `--config tests/json_config.py:/path/config.json` loads that JSON (the form in
which checkpoints and config.json store a config)."""

import json

import ml_collections


def get_config(path: str) -> ml_collections.ConfigDict:
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))
