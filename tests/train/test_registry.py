"""Every declared method against the registry, the shipped configs and the trainer.

Why this fails when a method is registered without configs: the configs-per-method test is
parametrised by ``METHOD_NAMES``, which is read from the registry itself. Adding ``"foo"``
to ``_STATIC`` in aligndistil/train/methods.py adds a ``foo`` case, and that case looks for
a file in configs/ AND one in configs/tiny/ whose loaded ``method.name`` is ``foo``; with
none it fails. Adding the files without describing them in ``EXPECTED`` below fails
``test_config_names_a_registered_method_and_its_variant`` in turn, and a new variant value
(a new entry of ``TEACHERS`` or ``MODES``) fails ``test_every_variant_has_a_config`` until a
config asks for it or ``NO_CONFIG`` says why none does.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

from aligndistil.config import from_dict, load_config
from aligndistil.data import KINDS
from aligndistil.train.methods import METHOD_NAMES, MODES, ROLES, TEACHERS, UNDECLARED, get_method

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "configs"
TINY = PAPER / "tiny"

#: What each shipped run config (the same stem in configs/ and configs/tiny/) asks for: the
#: registered method and the options that pick its variant.
EXPECTED = {
    "sft": ("sft", {}),
    "dpo": ("dpo", {"reverse": False}),
    "reverse_dpo": ("dpo", {"reverse": True}),
    "ipo": ("ipo", {}),
    "dpop": ("dpop", {}),
    "simpo": ("simpo", {}),
    "kto": ("kto", {}),
    "tdpo1": ("tdpo1", {}),
    "tdpo2": ("tdpo2", {}),
    "sparsepo": ("sparsepo", {}),
    "mapo": ("mapo", {}),
    "aligndistil_off_policy": ("aligndistil", {"mode": "off_policy", "teacher": "adaptive"}),
    "aligndistil_on_policy": ("aligndistil", {"mode": "on_policy", "teacher": "adaptive"}),
    "aligndistil_vanilla": ("aligndistil", {"mode": "off_policy", "teacher": "vanilla"}),
    "aligndistil_constant": ("aligndistil", {"mode": "off_policy", "teacher": "constant"}),
    "ppo": ("ppo", {}),
    "rto": ("rto", {"rto_recipe": "rto"}),
    "reinforce_sequence": ("reinforce", {"level": "sequence"}),
    "reinforce_token": ("reinforce", {"level": "token"}),
}

#: The options that pick a variant of a registered method, with every value get_method takes.
VARIANT_AXES = {"dpo": {"reverse": (False, True)}, "aligndistil": {"mode": MODES, "teacher": TEACHERS},
                "rto": {"rto_recipe": ("rto", "aligndistil")}, "reinforce": {"level": ("sequence", "token")}}

#: Variant values no shipped config asks for, and why.
NO_CONFIG = {
    ("aligndistil", "teacher", "contrastive"): "Eq. 15 is the step from the vanilla to the adaptive teacher; "
                                               "no run of its own is shipped (test_methods.py trains it)",
    ("rto", "rto_recipe", "aligndistil"): "the AlignDistil paper's RTO is configs/rto.yaml with "
                                          "method.rto_recipe=aligndistil (test_online_methods.py trains it)",
}


def _configs(folder: Path) -> dict[str, object]:
    return {p.stem: load_config(p) for p in sorted(folder.glob("*.yaml"))}


PAPER_CFGS, TINY_CFGS = _configs(PAPER), _configs(TINY)
ALL_CFGS = [(f"{d}/{stem}", cfg) for d, cfgs in (("configs", PAPER_CFGS), ("tiny", TINY_CFGS))
            for stem, cfg in cfgs.items()]


def _variants(name: str):
    """A MethodConfig for every variant of ``name`` (the product of its axes)."""
    axes = VARIANT_AXES.get(name, {})
    for values in itertools.product(*axes.values()):
        yield from_dict({"method": {"name": name, **dict(zip(axes, values))}}).method


ALL_VARIANTS = [m for name in METHOD_NAMES for m in _variants(name)]


def test_paper_and_tiny_configs_are_twins_and_all_described():
    assert set(PAPER_CFGS) == set(TINY_CFGS) == set(EXPECTED)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_registered_method_has_a_paper_and_a_tiny_config(name):
    for folder, cfgs in (("configs", PAPER_CFGS), ("configs/tiny", TINY_CFGS)):
        assert any(c.method.name == name for c in cfgs.values()), f"no file in {folder}/ has method.name={name}"


@pytest.mark.parametrize("where, cfg", ALL_CFGS, ids=[w for w, _ in ALL_CFGS])
def test_config_names_a_registered_method_and_its_variant(where, cfg):
    stem = where.split("/")[1]
    name, options = EXPECTED[stem]
    assert cfg.method.name == name in METHOD_NAMES
    assert {k: getattr(cfg.method, k) for k in options} == options
    assert get_method(cfg.method).name == name
    # Every variant option of this method is pinned by EXPECTED, so a file cannot drift to another variant.
    assert set(VARIANT_AXES.get(name, {})) == set(options)


def test_every_variant_has_a_config():
    for name, axes in VARIANT_AXES.items():
        assert name in METHOD_NAMES
        for axis, values in axes.items():
            for cfgs in (PAPER_CFGS, TINY_CFGS):
                shipped = {getattr(c.method, axis) for c in cfgs.values() if c.method.name == name}
                missing = {v for v in values if (name, axis, v) not in NO_CONFIG}
                assert shipped == missing, (name, axis)


@pytest.mark.parametrize("mcfg", ALL_VARIANTS, ids=lambda m: f"{m.name}-{m.mode}-{m.teacher}-{m.reverse}")
def test_declaration_is_consistent(mcfg):
    m = get_method(mcfg)
    assert m.name == mcfg.name and m.batch in KINDS and m.normaliser in ("sequences", "tokens")
    assert callable(m.loss)
    assert set(m.frozen) <= set(ROLES) and len(set(m.frozen)) == len(m.frozen)
    assert m.negative_role is None or m.negative_role in m.frozen
    if m.tvd_roles is not None:
        a, b = m.tvd_roles
        assert a != b and {a, b} <= set(m.frozen)
    # Cacheable or not is said explicitly, and a refusal says why.
    assert m.uncacheable != UNDECLARED
    assert m.uncacheable is None or (isinstance(m.uncacheable, str) and m.uncacheable.strip())
    if not m.frozen or m.prepare is not None:
        # Nothing to cache, or responses that do not exist before the step.
        assert m.uncacheable is not None
    if m.uncacheable is not None:
        assert m.tvd_roles is None


def test_the_vanilla_teacher_reads_the_reference_the_others_the_reverse_model():
    """The teacher rule as declared (AlignDistil Eq. 11 vs Eq. 15/17): base pi_dpo, negative
    pi_ref for vanilla and pi_rev otherwise; an off-policy cache stores TVD(pi_dpo, pi_rev)
    whenever pi_rev is loaded; on-policy there is no cache."""
    seen = {(c.mode, c.teacher): get_method(c) for c in _variants("aligndistil")}
    assert len(seen) == len(MODES) * len(TEACHERS)
    rev = ("dpo_model", "reverse_dpo_model")
    for (mode, teacher), m in seen.items():
        off = mode == "off_policy"
        assert m.batch == ("sft" if off else "prompt")
        if teacher == "vanilla":
            assert (m.frozen, m.negative_role, m.tvd_roles) == (("dpo_model", "reference"), "reference", None)
        else:
            assert (m.frozen, m.negative_role, m.tvd_roles) == (rev, "reverse_dpo_model", rev if off else None)
        assert (m.uncacheable is None) == off


def test_trainer_and_cache_name_no_method():
    """Method knowledge lives in the declarations: the trainer, its checkpoints and the teacher
    cache contain no method name as a string literal. ``sft`` is also a batch kind (the cache
    reads a batch's kind), so batch kinds are allowed."""
    names = set(METHOD_NAMES) - set(KINDS)
    for module in ("loop", "checkpoints", "teacher_cache"):
        tree = ast.parse((REPO / "src" / "aligndistil" / "train" / f"{module}.py").read_text())
        found = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in names}
        assert not found, f"train/{module}.py names {found}"
