"""Rewards for GRPO: plain Python functions ``(prompt, completion, example) -> float``, several summed with weights.

No reward model is needed. Built in (the names :func:`load_reward` takes):

- ``format``: 1.0 when the completion is well-formed (one leading ``<think>…</think>`` block, then a non-empty
  answer; :func:`llama.generation.quality.think_format_problem`), else 0.0.
- ``exact_match``: 1.0 when the answer part (:func:`answer_part`), normalised (:func:`normalise`), equals the
  example's ``answer`` field normalised, else 0.0.
- ``contains``: 1.0 when the normalised answer part contains the normalised ``answer`` field, else 0.0.
- ``length:MIN:MAX`` (or ``length:MIN:MAX:MARGIN``): :func:`length_window` on the completion's characters.
- ``repetition``: -1.0 when the completion ends in a loop (:func:`llama.generation.quality.find_loop`), else 0.0.
- ``path/to/file.py:function_name``: a function of your own, imported from that file.

Weights (:func:`parse_rewards`): ``NAME=WEIGHT``, the weight being what follows the *last* ``=`` (default 1), e.g.
``format=0.5``, ``length:50:400=0.2``, ``my_rewards.py:judge=2``. A file path that itself holds ``=`` needs an
explicit weight (``a=b.py:f=1``). :func:`score` sums the weighted values and reports each unweighted value by name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import numbers
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from llama.generation.constraints import THINK_CLOSE, THINK_OPEN
from llama.generation.quality import LoopRule, find_loop, think_format_problem

logger = logging.getLogger("llama.rewards")

Reward = Callable[[str, str, Mapping[str, Any]], float]

ANSWER_FIELD = "answer"
#: Stripped from the end of an answer before comparing (ASCII and full-width Chinese punctuation).
TRAILING_PUNCTUATION = ".!?,;:。！？，；：、…"
SPEC_HELP = "format, exact_match, contains, length:MIN:MAX[:MARGIN], repetition or path/to/file.py:function_name"


def answer_part(completion: str) -> str:
    """The answer of a completion: what follows its first ``</think>`` when it opens with ``<think>``, ``""`` when
    that block is never closed (no answer yet), else the whole completion (a reply without reasoning)."""
    if not completion.lstrip().startswith(THINK_OPEN):
        return completion
    return completion.split(THINK_CLOSE, 1)[1] if THINK_CLOSE in completion else ""


def normalise(text: str) -> str:
    """``text`` without surrounding whitespace and trailing punctuation (:data:`TRAILING_PUNCTUATION`)."""
    return text.strip().rstrip(TRAILING_PUNCTUATION).rstrip()


def expected_answer(example: Mapping[str, Any], reward: str) -> str:
    """The example's normalised ``answer`` field; refused when absent or empty."""
    if ANSWER_FIELD not in example:
        raise ValueError(
            f"reward {reward} needs an {ANSWER_FIELD!r} field in each example; this one has keys {sorted(example)}"
        )
    answer = normalise(str(example[ANSWER_FIELD]))
    if not answer:
        raise ValueError(f"reward {reward}: the example's {ANSWER_FIELD!r} field is empty; give every example one")
    return answer


def format_reward(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
    """1.0 when ``completion`` is ``<think>…</think>`` + a non-empty answer, else 0.0."""
    return 1.0 if think_format_problem(completion) is None else 0.0


def exact_match(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
    """1.0 when the normalised answer part equals the normalised ``answer`` field, else 0.0."""
    return 1.0 if normalise(answer_part(completion)) == expected_answer(example, "exact_match") else 0.0


def contains_answer(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
    """1.0 when the normalised answer part contains the normalised ``answer`` field, else 0.0."""
    return 1.0 if expected_answer(example, "contains") in normalise(answer_part(completion)) else 0.0


def repetition_penalty(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
    """-1.0 when ``completion`` ends in a loop under the default :class:`LoopRule`, else 0.0."""
    return -1.0 if find_loop(completion, LoopRule()) is not None else 0.0


def length_window(min_chars: int, max_chars: int, margin: int | None = None) -> Reward:
    """A reward on the completion's length in characters (think block included): 1.0 for ``min_chars`` to
    ``max_chars``; outside, it falls linearly to 0.0 over ``margin`` characters (0.0 at ``min_chars - margin`` and
    below, at ``max_chars + margin`` and above). ``margin`` defaults to half of ``max_chars`` (at least 1)."""
    margin = max(1, max_chars // 2) if margin is None else margin
    if min_chars < 0 or max_chars < min_chars or margin < 1:
        raise ValueError(
            f"length window needs 0 ≤ MIN ≤ MAX and MARGIN ≥ 1, got {min_chars}:{max_chars}:{margin}; "
            "give e.g. length:50:400"
        )

    def length_reward(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
        n = len(completion)
        outside = min_chars - n if n < min_chars else n - max_chars
        return max(0.0, 1.0 - max(outside, 0) / margin)

    return length_reward


BUILTINS: dict[str, Reward] = {
    "format": format_reward,
    "exact_match": exact_match,
    "contains": contains_answer,
    "repetition": repetition_penalty,
}


def parse_length(spec: str) -> Reward:
    """``length:MIN:MAX`` or ``length:MIN:MAX:MARGIN`` as a :func:`length_window`."""
    parts = spec.split(":")[1:]
    if len(parts) not in (2, 3) or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"reward {spec!r}: write length:MIN:MAX or length:MIN:MAX:MARGIN in whole characters")
    return length_window(*(int(p) for p in parts))


def load_file_reward(spec: str) -> Reward:
    """The function ``name`` of the Python file in ``path/to/file.py:name``."""
    path_text, _, name = spec.rpartition(":")
    path = Path(path_text)
    if not name or not path_text:
        raise ValueError(f"reward {spec!r}: write path/to/file.py:function_name")
    if not path.is_file():
        raise ValueError(f"reward {spec!r}: file {path} does not exist; give the path of a Python file")
    digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=6).hexdigest()
    module_spec = importlib.util.spec_from_file_location(f"zhllm_reward_{path.stem}_{digest}", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"reward {spec!r}: {path} cannot be imported; give a .py file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise ValueError(f"reward {spec!r}: {path} has no function {name!r}; define it or fix the name")
    function = getattr(module, name)
    if not callable(function):
        raise ValueError(
            f"reward {spec!r}: {name!r} in {path} is not callable ({type(function).__name__}); name a function"
        )
    logger.info("reward %s: loaded %s from %s", spec, name, path)
    return function


def load_reward(spec: str) -> Reward:
    """The reward named by ``spec`` (see the module docstring for the names)."""
    spec = spec.strip()
    if spec in BUILTINS:
        return BUILTINS[spec]
    if spec.startswith("length:"):
        return parse_length(spec)
    if ":" in spec:
        return load_file_reward(spec)
    raise ValueError(f"unknown reward {spec!r}: give one of {SPEC_HELP}")


def split_weight(spec: str) -> tuple[str, float]:
    """``NAME=WEIGHT`` as (NAME, WEIGHT); a spec without ``=`` weighs 1."""
    name, sep, weight_text = spec.strip().rpartition("=")
    if not sep:
        return spec.strip(), 1.0
    try:
        weight = float(weight_text)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight) or not name.strip():
        raise ValueError(f"reward {spec!r}: write NAME=WEIGHT with a finite number after the last '=', e.g. format=0.5")
    return name.strip(), weight


def parse_rewards(specs: Sequence[str]) -> list[tuple[str, float, Reward]]:
    """Each ``NAME`` or ``NAME=WEIGHT`` spec as (name, weight, function); a name given twice is refused."""
    if not specs:
        raise ValueError(f"no rewards given: give at least one of {SPEC_HELP}")
    rewards: list[tuple[str, float, Reward]] = []
    for spec in specs:
        name, weight = split_weight(spec)
        if any(name == seen for seen, _, _ in rewards):
            raise ValueError(f"reward {name!r} is given twice: give each once, with one weight")
        rewards.append((name, weight, load_reward(name)))
    return rewards


def score(
    rewards: Sequence[tuple[str, float, Reward]], prompt: str, completion: str, example: Mapping[str, Any]
) -> tuple[float, dict[str, float]]:
    """The weighted sum of ``rewards`` on one completion, and each reward's own (unweighted) value by name."""
    values: dict[str, float] = {}
    for name, _, function in rewards:
        value = function(prompt, completion, example)
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"reward {name!r} returned {value!r}; a reward must return a finite number")
        values[name] = float(value)
    return sum(weight * values[name] for name, weight, _ in rewards), values
