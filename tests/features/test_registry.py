"""features.registry: the one helper behind encoder families, denoise / ASR backends, head types."""
from __future__ import annotations

import sys
import types

import pytest

from features.errors import ConfigError
from features.registry import Registry


def test_register_as_decorator_and_as_call():
    reg: Registry = Registry("backend", "thing.backend")

    @reg.register("a")
    class A:
        pass

    def b() -> None:
        pass

    assert reg.register("b", b) is b
    assert reg.get("a") is A and reg.get("b") is b
    assert reg.names() == ["a", "b"] and "a" in reg and "c" not in reg


def test_the_same_object_twice_is_fine_another_one_is_an_error():
    reg: Registry = Registry("backend", "thing.backend")
    reg.register("a", len)
    reg.register("a", len)  # a module imported twice registers again: no error
    with pytest.raises(ConfigError, match=r"backend 'a' is registered twice \(builtins.len, "
                                          r"builtins.abs\); pick another name"):
        reg.register("a", abs)
    assert reg.get("a") is len  # the first one stays
    described = Registry("head type", "type", describe=lambda obj: f"<{obj}>")
    described.register("x", 1)
    with pytest.raises(ConfigError, match=r"\(<1>, <2>\)"):
        described.register("x", 2)


def test_unknown_name_names_the_key_and_lists_the_known_ones():
    reg: Registry = Registry("family", "embed.encoders.<name>.family", modules={"lazy": "nowhere.mod"},
                             renamed={"old": "new (the same thing)"})
    reg.register("b", 1)
    with pytest.raises(ConfigError) as err:
        reg.get("zzz")
    assert str(err.value) == ("embed.encoders.<name>.family: unknown family 'zzz'; known families are "
                              "['b', 'lazy']. Fix params.yaml.")
    with pytest.raises(ConfigError, match=r"unknown family 'old'.* It was renamed: use new \(the same"):
        reg.get("old")


def test_a_lazy_name_imports_its_module_on_first_use(tmp_path, monkeypatch):
    reg: Registry = Registry("plug-in", "plugins.name", modules={"plug": "lazy_plugin_mod"})
    host = types.ModuleType("plugin_host")  # where the plug-in module finds the registry
    host.PLUGINS = reg
    monkeypatch.setitem(sys.modules, "plugin_host", host)
    (tmp_path / "lazy_plugin_mod.py").write_text(
        "import plugin_host\nplugin_host.PLUGINS.register('plug', 'the plug-in')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_plugin_mod", raising=False)
    assert "plug" in reg and reg.names() == ["plug"]  # known before its module is imported
    assert "lazy_plugin_mod" not in sys.modules
    assert reg.get("plug") == "the plug-in"
    assert sys.modules.pop("lazy_plugin_mod")  # imported by get(); not left behind


def test_a_module_that_does_not_register_its_name_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "silent_plugin_mod.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg: Registry = Registry("plug-in", "plugins.name", modules={"quiet": "silent_plugin_mod"})
    with pytest.raises(ConfigError, match="silent_plugin_mod did not register it"):
        reg.get("quiet")
    sys.modules.pop("silent_plugin_mod")


# ---------------------------------------------------------------- the project's registries

def _project_registries() -> dict[str, tuple[Registry, str, list[str]]]:
    """name -> (registry, the message's start on an unknown name, names it must list)."""
    from features.audio import asr, denoise
    from features.encoders import FAMILIES
    from models.heads import registry as heads

    return {
        "encoder families": (FAMILIES, "embed.encoders.<name>.family: unknown family",
                             ["speech", "text", "vision"]),
        "denoise backends": (denoise.BACKENDS, "denoise.backend: unknown backend",
                             ["deepfilternet", "mossformer2", "none"]),
        "asr backends": (asr.BACKENDS, "asr.backend: unknown backend", ["faster_whisper", "transformers"]),
        "head types": (heads.HEADS, "type: unknown head type", sorted(heads.MODULES)),
    }


@pytest.mark.parametrize("which", ["encoder families", "denoise backends", "asr backends", "head types"])
def test_every_project_registry_is_one_and_lists_its_names(which):
    reg, start, known = _project_registries()[which]
    assert isinstance(reg, Registry)
    with pytest.raises(ConfigError) as err:
        reg.get("no-such-name")
    assert str(err.value).startswith(start + " 'no-such-name'; ")
    assert str(known) in str(err.value)


def test_the_project_entry_points_use_them():
    from features.audio.asr import AsrConfig, make_transcriber
    from features.audio.denoise import DenoiseConfig, Identity, make_denoiser
    from features.encoders import known_families
    from models.heads import registry as heads

    assert isinstance(make_denoiser(DenoiseConfig(backend="none")), Identity)
    with pytest.raises(ConfigError, match=r"known backends are \['faster_whisper', 'transformers'\]"):
        make_transcriber(AsrConfig(backend="whisperx"))
    assert known_families() >= {"speech", "text", "vision"}
    assert heads.get("probe").name == "probe" and heads.names() == heads.HEADS.names()
