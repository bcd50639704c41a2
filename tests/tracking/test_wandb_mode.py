"""Which wandb mode a run gets: offline unless the user says otherwise or has logged in."""

import pytest

from moba_train.tracking.wandb_run import resolve_mode

CASES = {
    "default-offline": (None, None, None, None, "offline"),
    "env-online": (None, "online", None, None, "online"),
    "config-beats-env": ("offline", "online", None, None, "offline"),
    "api-key-means-online": (None, None, "k", None, "online"),
    "netrc-login-means-online": (None, None, None, "machine api.wandb.ai\n  login user\n  password x\n", "online"),
    "other-netrc-entries-stay-offline": (None, None, None, "machine example.com\n  login u\n  password p\n", "offline"),
    "env-beats-login": (None, "disabled", "k", None, "disabled"),
}


@pytest.mark.parametrize("configured,env_mode,api_key,netrc,expected", CASES.values(), ids=CASES.keys())
def test_resolve_mode(tmp_path, monkeypatch, configured, env_mode, api_key, netrc, expected):
    for name, value in (("WANDB_MODE", env_mode), ("WANDB_API_KEY", api_key)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    netrc_path = tmp_path / "netrc"
    if netrc is not None:
        netrc_path.write_text(netrc)
        netrc_path.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_path))
    assert resolve_mode(configured) == expected


def test_unknown_mode_names_its_source(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE"):
        resolve_mode(None)
