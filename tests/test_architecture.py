"""The package's shape, checked: no import circles, no arrow pointing up a layer, no private
name imported across modules, and every config field is exactly one flag with its default.

Layers, top to bottom (a module may import its own layer or lower ones):
cli -> commands -> recipes -> training / evaluation / export / ollama / integrations / neuro
-> reward_model -> reward_settings / critic_files / model_card / hub -> reward / backends
-> data / specs / errors / validation / flags / io / display / cache_files / version / parallel
   / hardware
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = [
    ["cli"],
    ["commands"],
    ["recipes"],
    ["training", "evaluation", "export", "ollama", "integrations", "neuro"],
    ["reward_model"],
    ["reward_settings", "critic_files", "model_card", "hub"],
    ["reward", "backends"],
    ["data", "specs", "errors", "validation", "flags", "io", "display", "cache_files", "version",
     "parallel", "hardware"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def modules() -> dict[str, Path]:
    out = {}
    for f in (SRC / "tdreward").rglob("*.py"):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def imports(mods: dict[str, Path]) -> dict[str, list[tuple[str, list[str]]]]:
    """Every import of a tdreward module (at any depth of the code): (target, names)."""
    edges: dict[str, list[tuple[str, list[str]]]] = {m: [] for m in mods}
    for m, f in mods.items():
        base = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("tdreward"):
                        edges[m].append((a.name, []))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = base.split(".")
                    target = ".".join(parts[: len(parts) - node.level + 1]
                                      + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("tdreward"):
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in mods:  # `from pkg import module`
                        edges[m].append((sub, []))
                    else:
                        edges[m].append((target, [a.name]))
    return edges


def layer(module: str) -> int | None:
    parts = module.split(".")
    return RANK.get(parts[1]) if len(parts) > 1 else None


def test_every_module_has_a_layer():
    missing = sorted(m for m in modules() if m != "tdreward" and layer(m) is None)
    assert not missing, f"modules outside the layer map (add them to LAYERS): {missing}"


def test_no_import_circles():
    mods = modules()
    graph = {m: {t for t, _ in e if t in mods and t != m and not m.startswith(t + ".")}
             for m, e in imports(mods).items()}
    graph.pop("tdreward", None)  # the package face: lazy names only
    for targets in graph.values():
        targets.discard("tdreward")
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_arrow_points_up_a_layer():
    up = []
    for m, edges in imports(modules()).items():
        for t, _ in edges:
            lm, lt = layer(m), layer(t)
            if lm is not None and lt is not None and lt < lm:
                up.append(f"{m} -> {t}")
    assert not up, "imports that point up a layer:\n" + "\n".join(sorted(set(up)))


def test_no_private_name_is_imported_across_modules():
    private = [f"{m} imports {t}.{n}" for m, edges in imports(modules()).items()
               for t, names in edges for n in names
               if n.startswith("_") and not n.startswith("__") and t != m]
    assert not private, "\n".join(sorted(private))


# --------------------------------------------------------------------------- flags
def subcommand_parsers():
    import argparse

    from tdreward.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    seen = {}
    for name, p in sub.choices.items():
        if id(p) not in seen:
            seen[id(p)] = (name, p)
    return list(seen.values())


def test_every_config_field_is_exactly_one_flag_with_its_default():
    from tdreward.flags import _default, flag_fields

    checked = 0
    for name, p in subcommand_parsers():
        for cls in p.get_default("_configs") or ():
            for f, _ in flag_fields(cls):
                actions = [a for a in p._actions if a.dest == f.name]
                assert len(actions) == 1, (name, f.name, [a.option_strings for a in actions])
                default = _default(f)
                if default is dataclasses.MISSING:
                    assert actions[0].required or not actions[0].option_strings, (name, f.name)
                else:
                    assert actions[0].default == default, (name, f.name, actions[0].default,
                                                           default)
                checked += 1
    assert checked > 0


def test_every_flag_of_a_converted_command_comes_from_its_config():
    """A command whose parser holds a config declares no flag by hand (--help, the global
    --verbose/--debug and --config aside)."""
    from tdreward.flags import flag_fields

    for name, p in subcommand_parsers():
        configs = p.get_default("_configs") or ()
        if not configs:
            continue
        fields = {f.name for cls in configs for f, _ in flag_fields(cls)}
        hand = [a.dest for a in p._actions
                if a.dest not in fields | {"help", "verbose", "debug", "config"}]
        assert not hand, (name, hand)


def test_config_file_gives_defaults_and_flags_override(tmp_path):
    """`--config FILE` (JSON or YAML): its values become the subcommand's settings, required
    ones included; a flag on the command line still wins; an unknown key is an error."""
    from tdreward.cli import _apply_config, build_parser
    from tdreward.errors import TDRewardError
    from tdreward.evaluation.score_config import ScoreConfig
    from tdreward.flags import from_args

    cfg = tmp_path / "score.yaml"
    cfg.write_text("batch_size: 3\nterminal_at_end: true\n", encoding="utf-8")
    for argv, want in ((["score", "--config", str(cfg), "hi"], 3),
                       (["score", "--config", str(cfg), "--batch_size", "5", "hi"], 5)):
        parser = build_parser()
        _apply_config(parser, argv)
        args = parser.parse_args(argv)
        built = from_args(ScoreConfig, args)
        assert built.batch_size == want and built.terminal_at_end is True
    # A required setting from the file: train-critic's --dataset.
    req = tmp_path / "critic.json"
    req.write_text('{"dataset": "corpus.txt", "output_dir": "out"}', encoding="utf-8")
    parser = build_parser()
    argv = ["train-critic", "--config", str(req)]
    _apply_config(parser, argv)
    assert parser.parse_args(argv).dataset == "corpus.txt"
    bad = tmp_path / "bad.json"
    bad.write_text('{"no_such_setting": 1}', encoding="utf-8")
    with pytest.raises(TDRewardError, match="no_such_setting"):
        _apply_config(build_parser(), ["score", "--config", str(bad), "hi"])
