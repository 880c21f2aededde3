"""`FeatureSettings` and `resolve_settings`: one object for every choice, presets applied in one place."""

from __future__ import annotations

import pytest

from ditf import PRESETS, FeatureSettings, resolve_settings
from ditf.errors import InvalidArgumentError
from ditf.settings import parse_discard, task_protocol


def test_a_preset_fills_every_default_and_says_where_each_comes_from():
    settings = resolve_settings(PRESETS["flux-dev"], model="flux-dev")
    assert (settings.block, settings.t, settings.ensemble, settings.resolution, settings.guidance) == (28, 261.0, 8, 640, 3.5)
    assert settings.discard == "auto" and settings.variant == "ditf" and settings.model == "flux-dev"
    assert "DiTF authors' code" in settings.sources["block"] and settings.sources["model"] == "given"
    assert resolve_settings(PRESETS["flux-dev"], t=90).sources["t"] == "given"


def test_task_presets_apply_per_model_and_never_lend_one_models_numbers_to_another():
    flux = resolve_settings(PRESETS["flux-dev"], task="davis")
    assert (flux.block, flux.t, flux.ensemble, flux.prompt) == (24, 90.0, 1, "a photo of a image")
    assert "eval_davis.sh" in flux.sources["t"]
    sd3 = resolve_settings(PRESETS["sd3-medium"], task="davis")
    assert (sd3.block, sd3.t, sd3.ensemble) == (12, 261.0, 1)  # its own block and t, DAVIS' ensemble and prompt
    assert "sd3-medium has no published davis setting" in sd3.sources["t"]
    with pytest.raises(InvalidArgumentError, match=r"block, t are required: model 'my/folder' has no preset"):
        resolve_settings(None, task="davis", model="my/folder")
    assert task_protocol(PRESETS["flux-dev"], "spair") == {"prompt_mode": "class"}
    assert task_protocol(None, "davis", short_side=480)["short_side"] == 480


def test_unknown_and_invalid_settings_name_the_fix():
    with pytest.raises(InvalidArgumentError, match=r"unknown setting 'discrad' \(did you mean 'discard'\?\)"):
        resolve_settings(PRESETS["flux-dev"], discrad=[154])
    for bad, message in [({"t": 1261}, "outside 0..1000"), ({"ensemble": 0}, "ensemble=0 must be at least 1"),
                         ({"block": 2.5}, "block=2.5 must be a whole number"), ({"vae_sample": "twice"}, "vae_sample"),
                         ({"size": (64, 48), "resolution": 640}, "give one of them"), ({"dtype": "float32"}, "dtype"),
                         ({"massive_ratio": 0}, "greater than 0"), ({"discard": ","}, "channel indices separated")]:
        with pytest.raises(InvalidArgumentError, match=message):
            FeatureSettings(**{"block": 28, "t": 261, "ensemble": 8, **bad})


def test_discard_has_one_canonical_form():
    assert parse_discard("154,1446") == parse_discard([1446, 154]) == (154, 1446)
    assert parse_discard("none") is None and parse_discard("auto") == "auto"
    with pytest.raises(InvalidArgumentError, match="duplicates"):
        parse_discard([3, 3])
    with pytest.raises(InvalidArgumentError, match="pass None to discard nothing"):
        parse_discard([])
    assert resolve_settings(PRESETS["flux-dev"], discard=None).discard is None  # None is a choice here, not "unset"


def test_size_and_resolution_replace_each_other_and_settings_round_trip_through_json():
    settings = resolve_settings(PRESETS["flux-dev"])
    sized = settings.replace(size=(512, 640))
    assert (sized.size, sized.resolution) == ((512, 640), None) and sized.sources["size"] == "given"
    assert sized.replace(resolution=320).size is None
    assert FeatureSettings.from_dict(sized.to_dict()) == sized
    assert settings.replace(normalize=False, modulate=False, discard=None).variant == "raw"
    assert settings.replace(discard=(154, 1446)).variant == "ditf"
