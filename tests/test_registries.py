"""What every registered attack, defense and sequela axis must carry, checked for each one, so that
a component added later (one file, one registry entry, one test) is held to the same: a title and a
paper for the pages, help for every setting, the paper cited in its module, and a place in the
README's tour."""
import os
import re
import sys

import pytest

from bdft_core.attacks import ATTACKS
from bdft_core.defenses import DEFENSES
from bdft_core.sequela import AXES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = [(kind, name, cls) for kind, reg in (("attack", ATTACKS), ("defense", DEFENSES), ("sequela axis", AXES))
       for name, cls in reg.items()]


@pytest.mark.parametrize("kind, name, cls", ALL, ids=[f"{k}:{n}" for k, n, _ in ALL])
def test_each_component_names_its_paper_and_explains_its_settings(kind, name, cls):
    assert cls.name == name and cls.title and cls.paper, f"{kind} {name}: title and paper are shown on the pages"
    assert set(cls.help) == set(cls.defaults), f"{kind} {name}: one help text per setting"
    cfg = cls.get_default_config()
    assert cfg == cls.defaults and cfg is not cls.defaults  # a copy: editing it changes no default
    doc = (sys.modules[cls.__module__].__doc__ or "") + (cls.__doc__ or "")
    author = re.match(r"[A-Z][\w-]+", cls.paper).group(0)
    when = re.findall(r"arXiv:\d{4}\.\d{4,5}|(?:19|20)\d\d", cls.paper)  # its year or its arXiv id
    assert author in doc and any(w in doc for w in when), f"{kind} {name}: its module docstring cites {cls.paper!r}"


def test_the_readme_tour_names_every_registered_component():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    missing = [f"{kind} {name}" for kind, name, _ in ALL if f"`{name}`" not in text]
    assert not missing, f"not in README.md: {missing}"


def test_the_public_names_are_importable_from_the_package():
    import bdft_core

    missing = [n for n in bdft_core.__all__ if not hasattr(bdft_core, n)]
    assert not missing
    # the library tour's entry points, one import away (captum-style re-exports)
    for n in ("run_attack", "run_defense", "run_demo", "RunStore", "compare_defenses", "SweepSpec", "run_sweep",
              "evaluate", "context_for", "sequela_run", "PoisonedTraining", "setup_threads", "tune_allocator"):
        assert n in bdft_core.__all__, n
