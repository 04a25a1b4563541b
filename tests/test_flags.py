"""flags.py against a small stage file written here: types (booleans strictly), required flags, choices, help
text joined across lines and never cut at a '#' inside a string, and prefix stripping."""
import runpy

import pytest

import flags

STAGE = '''"""A stage."""
# ----------------------------------------------------------------------------- hyperparameters
name = "x"               # a string
steps = 10               # an int
lr = 0.5                 # a float; 50% of one
compile = False          # a boolean
resume = True            # another
marker = "a # b"         # the help of a string holding a hash
window = 4               # a comment that goes on
                         # on the next indented line
# a section comment at column 0 is no flag's help
mode = "sft"             # one of sft, rl
out = ""                 # where to write
# ----------------------------------------------------------------------------- end of hyperparameters
after = 1                # outside the block: not a flag
# ----------------------------------------------------------------------------- sampler
s_temperature = 1.0      # prefixed in the file, not on the command line
s_top_k = 0              # likewise
# ----------------------------------------------------------------------------- end of sampler
'''


@pytest.fixture
def stage(tmp_path):
    path = tmp_path / "stage.py"
    path.write_text(STAGE)
    return str(path), runpy.run_path(str(path))


def parse(stage, *argv, **kwargs):
    path, namespace = stage
    return flags.parse(path, namespace, list(argv), **kwargs)


def test_defaults_and_types(stage):
    args = parse(stage)
    assert vars(args) == {"name": "x", "steps": 10, "lr": 0.5, "compile": False, "resume": True, "marker": "a # b",
                          "window": 4, "mode": "sft", "out": ""}
    args = parse(stage, "--name=y", "--steps=3", "--lr=1e-3", "--marker=#1", "--out", "dir")
    assert (args.name, args.steps, args.lr, args.marker, args.out) == ("y", 3, 1e-3, "#1", "dir")
    assert type(args.steps) is int and type(args.lr) is float
    for bad in ("--steps=1.5", "--lr=fast"):
        with pytest.raises(SystemExit):
            parse(stage, bad)


@pytest.mark.parametrize("text, value", [("False", False), ("false", False), ("0", False), ("no", False),
                                         ("off", False), ("true", True), ("True", True), ("1", True), ("yes", True),
                                         ("on", True)])
def test_booleans_read_their_words_never_pythons_bool(stage, text, value):
    assert parse(stage, f"--compile={text}").compile is value
    assert parse(stage, f"--resume={text}").resume is value


def test_a_bare_boolean_flag_is_true_and_a_wrong_word_is_an_error(stage, capsys):
    assert parse(stage, "--compile").compile is True
    assert parse(stage, "--resume", "--steps=2").resume is True
    with pytest.raises(SystemExit):
        parse(stage, "--compile=maybe")
    assert "'maybe'" in capsys.readouterr().err


def test_required_and_choices(stage, capsys):
    with pytest.raises(SystemExit):
        parse(stage, required=("out",))
    assert "--out" in capsys.readouterr().err
    assert parse(stage, "--out=o", required=("out",)).out == "o"
    assert parse(stage, "--mode=rl", choices={"mode": ("sft", "rl")}).mode == "rl"
    with pytest.raises(SystemExit):
        parse(stage, "--mode=ppo", choices={"mode": ("sft", "rl")})
    assert "invalid choice" in capsys.readouterr().err


def test_help_is_the_comment_joined_and_never_cut_at_a_hash_in_a_value(stage):
    help_of = dict(flags.read_block(stage[0]))
    assert help_of["window"] == "a comment that goes on on the next indented line"
    assert help_of["marker"] == "the help of a string holding a hash"
    assert help_of["mode"] == "one of sft, rl"          # the column-0 comment above it joined nothing
    assert "after" not in help_of and "s_top_k" not in help_of
    assert list(help_of) == ["name", "steps", "lr", "compile", "resume", "marker", "window", "mode", "out"]


def test_help_output_shows_help_and_default(stage, capsys):
    with pytest.raises(SystemExit):
        parse(stage, "-h")
    text = " ".join(capsys.readouterr().out.split())    # argparse wraps lines
    assert "a float; 50% of one (default: 0.5)" in text
    assert "a comment that goes on on the next indented line (default: 4)" in text
    assert "A stage." in text                            # the module docstring is the description


def test_prefix_is_stripped_from_flag_names(stage):
    args = parse(stage, "--temperature=0.5", block="sampler", prefix="s_")
    assert vars(args) == {"temperature": 0.5, "top_k": 0}
    with pytest.raises(SystemExit):
        parse(stage, "--s_temperature=0.5", block="sampler", prefix="s_")


def test_a_missing_block_is_an_error(stage):
    with pytest.raises(ValueError, match="no '# --- evaluation'"):
        flags.read_block(stage[0], block="evaluation")
