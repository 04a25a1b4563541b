"""
flags.py: every stage's hyperparameters as command-line flags, from one commented block.

Each stage script keeps its knobs as module-level assignments between two marker lines, nanoGPT style:

    # ----------------------------------------------------------------------------- hyperparameters
    k = 4                      # rollouts per query per mode (paper: 5 in v1, 8 in v3)
    temperature = 1.0          # sampling temperature
                               # (a comment line under it continues the help)
    # ----------------------------------------------------------------------------- end of hyperparameters

and `args = flags.parse(__file__, globals())` turns each line into `--k=4`: the value is the default, its type is
the flag's type, and the comment is its help, so `python X.py -h` shows the block as written. Booleans read
true/false, yes/no, on/off and 1/0 (a bare `--flag` is true), never Python's bool("False") == True.
"""
import argparse
import io
import re
import tokenize

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def boolean(text):
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected one of {'/'.join(TRUE)} or {'/'.join(FALSE)}, got {text!r}")


def read_block(path, block="hyperparameters"):
    """[(name, help)] of the assignments between `# --- <block>` and `# --- end of <block>` in the file at path."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    start = re.search(rf"^# -+ {block}\s*$", source, re.M)
    end = re.search(rf"^# -+ end of {block}\s*$", source, re.M)
    if not (start and end):
        raise ValueError(f"{path}: no '# --- {block}' ... '# --- end of {block}' block")
    first_line = source.count("\n", 0, start.end()) + 2
    last_line = source.count("\n", 0, end.start())
    entries, name, assigned_line = [], None, None
    # tokenize, not a regex, finds the comments: a value may be a string holding "#"
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        line = token.start[0]
        if not first_line <= line <= last_line:
            continue
        if token.type == tokenize.NAME and token.start[1] == 0:
            name, assigned_line = token.string, line
        elif token.type == tokenize.COMMENT and name is not None:
            comment = token.string.lstrip("#").strip()
            if line == assigned_line:
                entries.append([name, comment])
            elif token.start[1] > 0 and entries and entries[-1][0] == name:
                entries[-1][1] += " " + comment          # an indented comment line continues the help
            else:
                name = None                              # a section comment at column 0 ends the entry
    return [tuple(entry) for entry in entries]


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each flag's default after its help."""


def parse(path, namespace, argv=None, block="hyperparameters", prefix="", required=(), choices=None,
          description=None, prog=None):
    """argparse.Namespace of the block's flags. namespace: the module's globals(), where the defaults live.
    prefix: stripped from variable names to make flag names (bench.py keeps two blocks apart that way).
    required: flag names that must be given. choices: {flag name: allowed values}."""
    parser = argparse.ArgumentParser(prog=prog, description=description if description is not None
                                     else namespace.get("__doc__"), formatter_class=_Formatter)
    choices = choices or {}
    for name, help_text in read_block(path, block):
        flag = name[len(prefix):] if name.startswith(prefix) else name
        default = namespace[name]
        kind = {bool: boolean, type(None): str}.get(type(default), type(default))
        extra = {"nargs": "?", "const": True} if kind is boolean else {}
        parser.add_argument(f"--{flag}", type=kind, default=default, required=flag in required,
                            choices=choices.get(flag), help=help_text.replace("%", "%%"), dest=flag, **extra)
    return parser.parse_args(argv)
