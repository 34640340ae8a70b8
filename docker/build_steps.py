"""Read a Dockerfile and replay the steps that install Python, without a Docker engine.

The development machines and CI have no Docker engine, so the images are never built there.
What can still go wrong in a Dockerfile, and be checked without one, is mostly the Python half:
a COPY that misses a file the build needs, a `.dockerignore` that hides one, a `pip install`
that cannot resolve, an ENTRYPOINT that names no installed script, an ENV value the settings
reject. This module replays exactly those parts of a Dockerfile's final stage:

* ENV and ARG values, expanded the way the Dockerfile frontend expands them;
* WORKDIR;
* COPY from the build context into a scratch directory that stands for the image's `/`,
  honouring the Dockerfile's own ignore file (`<Dockerfile>.dockerignore`, else the context's
  `.dockerignore`) and BuildKit's rule that a COPY wildcard may match nothing;
* every `pip install` (or `python -m pip install`) inside RUN, with its own arguments, paths
  mapped into the scratch root, into a throwaway virtual environment.

Every other RUN command (`useradd`, `mkdir`, `apt-get`, ...) is listed as not replayed, so a
caller can assert that nothing Python-related was skipped. The replay adds `--no-index
--no-build-isolation` to pip, so it resolves against the packages already installed in the
environment that the throwaway venv borrows (`base_site_packages`) instead of downloading
them: it proves the project builds from what the Dockerfile copies and that its dependencies
are consistent, not that PyPI serves them today.

Usage::

    python docker/build_steps.py docker/Dockerfile.cpu            # list the steps
    python docker/build_steps.py docker/Dockerfile.cpu --replay /tmp/replay
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

# RUN commands the replay may skip: they set up users and directories, not Python packages.
# Anything else in a RUN (apt-get, curl, a second pip) makes `unreplayed_commands` say so.
SYSTEM_SETUP_COMMANDS = frozenset({"groupadd", "useradd", "mkdir", "chown", "chmod", "rm"})

OFFLINE_PIP_ARGS = ("--no-index", "--no-build-isolation")


class DockerfileError(ValueError):
    """A Dockerfile construct this replay does not understand; it refuses rather than guesses."""


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined and comment lines dropped."""

    keyword: str
    value: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON-array form (`["a", "b"]`) as a list, or None for the shell form."""
        text = self.value.strip()
        if not text.startswith("["):
            return None
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return None
        if isinstance(parsed, list) and all(isinstance(item, str) for item in parsed):
            return parsed
        return None


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions, as the Dockerfile frontend does with `\\` escapes.

    Heredocs (`RUN <<EOF`) are refused: they would need a shell parser to replay honestly.
    """
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue  # blank, comment, or parser directive (`# syntax=...`)
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped
        if not pending:
            start = number
        if raw.rstrip().endswith("\\"):
            pending.append(raw.rstrip()[:-1])
            continue
        pending.append(raw)
        joined = " ".join(part.strip() for part in pending if part.strip())
        pending = []
        keyword, _, value = joined.partition(" ")
        if "<<" in value and keyword.upper() in {"RUN", "COPY"}:
            raise DockerfileError(f"line {start}: heredocs are not supported by the replay")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
    if pending:
        raise DockerfileError("the last instruction ends with a line continuation")
    return instructions


_VARIABLE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-+])?(?P<word>[^}]*)\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def expand(text: str, env: Mapping[str, str]) -> str:
    """Dockerfile variable substitution: `$V`, `${V}`, `${V:-word}`, `${V:+word}`.

    Text inside single quotes is left alone, as a shell would leave it in a RUN.
    """

    def substitute(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("plain")
        value = env.get(name)
        op = match.group("op")
        if op is None:
            return value or ""
        word = match.group("word")
        if op in {":-", "-"}:
            unset = value is None or (op == ":-" and value == "")
            return word if unset else value
        present = value is not None and (op == "+" or value != "")
        return word if present else ""

    pieces = re.split(r"('[^']*')", text)
    return "".join(
        piece if piece.startswith("'") else _VARIABLE.sub(substitute, piece) for piece in pieces
    )


def _key_values(value: str, env: Mapping[str, str]) -> dict[str, str]:
    """`ENV A=1 B="two words"` (or the legacy `ENV A 1`) as a dict, values expanded."""
    words = shlex.split(value, posix=True)
    if words and "=" not in words[0]:
        return {words[0]: expand(" ".join(words[1:]), env)}
    result: dict[str, str] = {}
    for word in words:
        name, sep, item = word.partition("=")
        if not sep:
            raise DockerfileError(f"cannot read {word!r} in {value!r}")
        result[name] = expand(item, {**env, **result})
    return result


@dataclass
class Stage:
    """The instructions from one FROM to the next."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    """A parsed Dockerfile and the facts about its final stage that tests ask for."""

    path: Path
    instructions: list[Instruction]

    @classmethod
    def read(cls, path: str | Path) -> Dockerfile:
        path = Path(path)
        return cls(path, parse_dockerfile(path.read_text(encoding="utf-8")))

    @property
    def stages(self) -> list[Stage]:
        stages: list[Stage] = []
        for instruction in self.instructions:
            if instruction.keyword == "FROM":
                words = instruction.value.split()
                words = [w for w in words if not w.startswith("--platform")]
                name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
                stages.append(Stage(words[0], name))
            elif stages:
                stages[-1].instructions.append(instruction)
            elif instruction.keyword != "ARG":
                raise DockerfileError(f"line {instruction.line}: {instruction.keyword} before FROM")
        if not stages:
            raise DockerfileError(f"{self.path}: no FROM")
        return stages

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.final.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """ARG defaults and ENV values of the final stage, in order, as a RUN step sees them."""
        env: dict[str, str] = {}
        for instruction in self.final.instructions:
            if instruction.keyword == "ENV":
                env.update(_key_values(instruction.value, env))
            elif instruction.keyword == "ARG":
                name, _, default = instruction.value.partition("=")
                env.setdefault(name.strip(), expand(default.strip().strip('"'), env))
        return env

    def image_env(self) -> dict[str, str]:
        """ENV values only: what the running container gets (build ARGs are not kept)."""
        env: dict[str, str] = {}
        for instruction in self.of("ENV"):
            env.update(_key_values(instruction.value, env))
        return env

    def exec_list(self, keyword: str) -> list[str] | None:
        instructions = self.of(keyword)
        return instructions[-1].exec_form() if instructions else None

    def user(self) -> str | None:
        users = self.of("USER")
        return users[-1].value if users else None

    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """The HEALTHCHECK's `--option=value`s and its CMD in exec form."""
        checks = self.of("HEALTHCHECK")
        if not checks:
            raise DockerfileError(f"{self.path}: no HEALTHCHECK")
        words = checks[-1].value
        options: dict[str, str] = {}
        while words.startswith("--"):
            option, _, words = words.partition(" ")
            name, _, value = option[2:].partition("=")
            options[name] = value
            words = words.strip()
        keyword, _, command = words.partition(" ")
        if keyword.upper() != "CMD":
            raise DockerfileError(f"{self.path}: HEALTHCHECK {keyword} is not CMD")
        exec_form = Instruction("CMD", command, checks[-1].line).exec_form()
        if exec_form is None:
            raise DockerfileError(f"{self.path}: HEALTHCHECK CMD should be in exec form")
        return options, exec_form

    def ignore_file(self, context: Path) -> Path | None:
        """The ignore file BuildKit uses: `<Dockerfile>.dockerignore`, else the context's."""
        specific = self.path.with_name(self.path.name + ".dockerignore")
        if specific.is_file():
            return specific
        general = context / ".dockerignore"
        return general if general.is_file() else None


class DockerIgnore:
    """`.dockerignore` matching: Go `filepath.Match` globs, `**`, `!` exceptions, last match wins.

    As in Docker's patternmatcher, a pattern that matches a directory matches everything in it.
    """

    def __init__(self, patterns: Sequence[str]) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in patterns:
            pattern = raw.strip()
            if not pattern or pattern.startswith("#"):
                continue
            negated = pattern.startswith("!")
            pattern = pattern[1:].strip() if negated else pattern
            pattern = os.path.normpath(pattern).lstrip("/")
            self.rules.append((negated, re.compile(self._regex(pattern))))

    @classmethod
    def read(cls, path: Path | None) -> DockerIgnore:
        return cls(path.read_text(encoding="utf-8").splitlines() if path else [])

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "^", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i : end + 1].replace("[!", "[^"), end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return out + "$"

    def excludes(self, relative: str) -> bool:
        parts = PurePosixPath(relative).parts
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for negated, regex in self.rules:
            if any(regex.match(candidate) for candidate in candidates):
                excluded = not negated
        return excluded


@dataclass(frozen=True)
class Step:
    """What the replay did with one instruction or one command of a RUN."""

    line: int
    action: str  # "copied", "env", "workdir", "pip", "not replayed", "ignored"
    detail: str


@dataclass
class ReplayReport:
    root: Path
    python: Path
    env: dict[str, str]
    workdir: PurePosixPath
    steps: list[Step] = field(default_factory=list)

    def unreplayed_commands(self) -> list[str]:
        """Skipped RUN commands that are not plain user/directory setup."""
        skipped = [s.detail for s in self.steps if s.action == "not replayed"]
        return [c for c in skipped if shlex.split(c)[0] not in SYSTEM_SETUP_COMMANDS]

    def pip_steps(self) -> list[Step]:
        return [s for s in self.steps if s.action == "pip"]

    def host_path(self, container_path: str | PurePosixPath) -> Path:
        return to_host(self.root, self.workdir, str(container_path))


def to_host(root: Path, workdir: PurePosixPath, container_path: str) -> Path:
    absolute = workdir / container_path  # an absolute container_path replaces workdir
    return root.joinpath(*PurePosixPath(os.path.normpath(str(absolute))).parts[1:])


def run_commands(shell_command: str) -> Iterator[list[str]]:
    """The commands of a shell-form RUN that chains them with `&&` only.

    Any other shell operator (`;`, `|`, `||`, redirections) is refused, so a replay never
    pretends to understand a pipeline it would have to run differently.
    """
    lexer = shlex.shlex(shell_command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    command: list[str] = []
    for token in lexer:
        if token == "&&":
            if command:
                yield command
            command = []
        elif token and set(token) <= set("&|;<>()"):
            raise DockerfileError(f"RUN uses {token!r}; the replay understands only '&&' chains")
        else:
            command.append(token)
    if command:
        yield command


def pip_install_arguments(argv: Sequence[str]) -> list[str] | None:
    """The arguments after `pip install` / `python -m pip install`, or None for other commands."""
    names = [Path(word).name for word in argv[:4]]
    if len(argv) >= 2 and names[0] in {"pip", "pip3"} and argv[1] == "install":
        return list(argv[2:])
    if (
        len(argv) >= 4
        and re.fullmatch(r"python(3(\.\d+)?)?", names[0])
        and argv[1:4] == ["-m", "pip", "install"]
    ):
        return list(argv[4:])
    return None


def _copy(report: ReplayReport, instruction: Instruction, context: Path, ignore: DockerIgnore):
    words = instruction.exec_form() or shlex.split(instruction.value)
    flags = [w for w in words if w.startswith("--")]
    words = [expand(w, report.env) for w in words if not w.startswith("--")]
    if any(flag.startswith("--from") for flag in flags):
        raise DockerfileError(f"line {instruction.line}: COPY --from is not replayed")
    *sources, dest = words
    dest_is_dir = dest.endswith("/") or len(sources) > 1
    target = report.host_path(dest)
    for source in sources:
        pattern = os.path.normpath(source).lstrip("/")
        has_wildcard = any(ch in pattern for ch in "*?[")
        matches = sorted(context.glob(pattern)) if has_wildcard else [context / pattern]
        matches = [
            m
            for m in matches
            if m.exists() and not ignore.excludes(m.relative_to(context).as_posix())
        ]
        if not matches and not has_wildcard:
            why = "excluded by the ignore file" if (context / pattern).exists() else "missing"
            raise DockerfileError(f"line {instruction.line}: COPY source {source!r} is {why}")
        for match in matches:
            relative = match.relative_to(context).as_posix()
            if match.is_dir():
                for file in sorted(p for p in match.rglob("*") if p.is_file()):
                    inner = file.relative_to(context).as_posix()
                    if ignore.excludes(inner):
                        continue
                    destination = target / file.relative_to(match)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, destination)
            else:
                destination = target / match.name if dest_is_dir else target
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(match, destination)
            report.steps.append(Step(instruction.line, "copied", f"{relative} -> {dest}"))


def _pip(report: ReplayReport, line: int, arguments: list[str], extra: Sequence[str]) -> None:
    mapped = []
    for word in arguments:
        if word.startswith("/"):
            word = str(report.host_path(word))
        mapped.append(word)
    command = [str(report.python), "-m", "pip", "install", *extra, *mapped]
    env = {
        k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}
    }
    env.update({k: v for k, v in report.env.items() if k != "PATH"})
    env["PATH"] = os.pathsep.join([str(report.python.parent), env.get("PATH", "")])
    cwd = report.host_path(report.workdir)
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise DockerfileError(
            f"line {line}: pip install {' '.join(arguments)} failed in the replay:\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    report.steps.append(Step(line, "pip", " ".join(arguments)))


def make_replay_venv(target: Path, base_site_packages: Sequence[Path] = ()) -> Path:
    """A venv without pip of its own that sees `base_site_packages` after its own site-packages.

    The borrowed directories are appended to sys.path by a `.pth` line (their own `.pth` files,
    such as editable installs, are not run), so pip finds the heavy dependencies installed and
    installs only the project into the venv; pip refuses to uninstall anything outside it.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    python = target / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    lines = "".join(f"{Path(p).resolve()}\n" for p in base_site_packages)
    (Path(purelib) / "_replay_borrowed_site_packages.pth").write_text(lines, encoding="utf-8")
    return python


def replay(
    dockerfile: Dockerfile,
    context: Path,
    root: Path,
    python: Path,
    pip_extra: Sequence[str] = OFFLINE_PIP_ARGS,
) -> ReplayReport:
    """Replay the final stage of `dockerfile` into `root` (the image's `/`) and `python`'s venv."""
    report = ReplayReport(root=root, python=python, env={}, workdir=PurePosixPath("/"))
    ignore = DockerIgnore.read(dockerfile.ignore_file(context))
    for instruction in dockerfile.final.instructions:
        keyword = instruction.keyword
        if keyword == "ENV":
            report.env.update(_key_values(instruction.value, report.env))
            report.steps.append(Step(instruction.line, "env", instruction.value))
        elif keyword == "ARG":
            name, _, default = instruction.value.partition("=")
            report.env.setdefault(name.strip(), expand(default.strip().strip('"'), report.env))
            report.steps.append(Step(instruction.line, "env", instruction.value))
        elif keyword == "WORKDIR":
            report.workdir = report.workdir / expand(instruction.value, report.env)
            report.host_path(report.workdir).mkdir(parents=True, exist_ok=True)
            report.steps.append(Step(instruction.line, "workdir", str(report.workdir)))
        elif keyword in {"COPY", "ADD"}:
            if keyword == "ADD":
                raise DockerfileError(f"line {instruction.line}: use COPY; ADD is not replayed")
            _copy(report, instruction, context, ignore)
        elif keyword == "RUN":
            if instruction.exec_form() is not None:
                raise DockerfileError(f"line {instruction.line}: exec-form RUN is not replayed")
            # The shell would expand $VARS from ENV and ARG; expand first, then split.
            for argv in run_commands(expand(instruction.value, report.env)):
                arguments = pip_install_arguments(argv)
                if arguments is None:
                    report.steps.append(Step(instruction.line, "not replayed", shlex.join(argv)))
                else:
                    _pip(report, instruction.line, arguments, pip_extra)
        else:
            report.steps.append(Step(instruction.line, "ignored", f"{keyword} {instruction.value}"))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dockerfile", type=Path)
    parser.add_argument("--context", type=Path, default=Path("."), help="build context (.)")
    parser.add_argument(
        "--replay",
        type=Path,
        metavar="DIR",
        help="replay into DIR/root and DIR/venv, borrowing this interpreter's site-packages",
    )
    args = parser.parse_args(argv)
    dockerfile = Dockerfile.read(args.dockerfile)
    if args.replay is None:
        for instruction in dockerfile.final.instructions:
            print(f"{instruction.line:4d} {instruction.keyword} {instruction.value}")
        return 0
    base = sorted({Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")})
    python = make_replay_venv(args.replay / "venv", base)
    report = replay(dockerfile, args.context.resolve(), args.replay / "root", python)
    for step in report.steps:
        print(f"{step.line:4d} {step.action:13s} {step.detail}")
    for command in report.unreplayed_commands():
        print(f"warning: not replayed and not plain setup: {command}", file=sys.stderr)
    return 1 if report.unreplayed_commands() else 0


if __name__ == "__main__":
    sys.exit(main())
