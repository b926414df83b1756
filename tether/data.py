"""Reading prompt files, applying chat templates, and walking a prompt set in resumable order.

Files are JSON Lines (one object a line), Parquet, or a `datasets` folder saved with
`save_to_disk` (docs/data.md). A prompt record is `{"prompt": str}` or
`{"messages": [{"role": ..., "content": ...}, ...]}`. A malformed record is a `DataError` naming
the file, the line (or row) and what was expected.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from tether.config import PromptData
from tether.errors import TetherError

log = logging.getLogger(__name__)


class DataError(TetherError, ValueError):
    """A data file or record that cannot be used; the message names the file and line."""


def shipped_data(name: str) -> str:
    """Path of a data file that ships inside the tether package (tether/assets/NAME)."""
    return str(Path(__file__).resolve().parent / "assets" / name)


def read_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line or row number, record) for every record of a JSON Lines, Parquet or datasets file.

    Numbers are 1-based: a JSON Lines file's line, or a Parquet / datasets row.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        return _read_datasets_folder(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read data file {path}: {err.strerror or err}") from err
    try:
        text = raw.decode("utf-8-sig")  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError as err:
        bad_line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"cannot read data file {path}, line {bad_line}: byte {raw[err.start]:#04x} is not UTF-8 text "
            f"({err.reason}); save the file as UTF-8"
        ) from err
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}, line {number}: not valid JSON ({err.msg}); expected one JSON object a line"
            ) from err
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    if not records:
        raise DataError(f"data file {path} holds no records")
    return records


def _read_parquet(path: Path) -> list[tuple[int, dict[str, Any]]]:
    from datasets import Dataset

    try:
        table = Dataset.from_parquet(str(path))
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"cannot read Parquet file {path}: {err}") from err
    records = [(i + 1, dict(row)) for i, row in enumerate(table)]
    if not records:
        raise DataError(f"data file {path} holds no records")
    return records


def _read_datasets_folder(path: Path) -> list[tuple[int, dict[str, Any]]]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path} is a folder but not a dataset saved with save_to_disk: {err}") from err
    if isinstance(loaded, DatasetDict):
        raise DataError(f"{path} holds several splits ({', '.join(loaded)}); point to one split's folder")
    assert isinstance(loaded, Dataset)
    records = [(i + 1, dict(row)) for i, row in enumerate(loaded)]
    if not records:
        raise DataError(f"data file {path} holds no records")
    return records


def _is_json_lines(path: str | Path) -> bool:
    path = Path(path)
    return not path.is_dir() and path.suffix != ".parquet"


@dataclass(frozen=True)
class Prompt:
    """One prompt: the conversation to continue, and the plain text reward functions see."""

    messages: tuple[dict[str, str], ...]
    text: str  # the last user turn (the whole prompt for {"prompt": str} records)


def load_prompts(path: str | Path) -> list[Prompt]:
    prompts = []
    unit = "line" if _is_json_lines(path) else "row"
    for number, record in read_records(path):
        where = f"{path}, {unit} {number}"
        # Parquet and datasets rows carry every column: a null one counts as absent.
        prompt_given = record.get("prompt") is not None or ("prompt" in record and record.get("messages") is None)
        if prompt_given:
            text = record["prompt"]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: field 'prompt' must be a non-empty string, got {text!r}")
            prompts.append(Prompt(({"role": "user", "content": text},), text))
        elif record.get("messages") is not None:
            messages = _check_messages(record["messages"], where)
            user_turns = [m["content"] for m in messages if m["role"] == "user"]
            prompts.append(Prompt(tuple(messages), user_turns[-1] if user_turns else messages[-1]["content"]))
        else:
            raise DataError(f"{where}: expected a field 'prompt' (a string) or 'messages' (a list of turns)")
    return prompts


ROLES = ("system", "user", "assistant", "tool")  # the turns chat templates know


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    checked = []
    for i, turn in enumerate(messages):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("role"), str)
            or not isinstance(turn.get("content"), str)
        ):
            raise DataError(f"{where}: messages[{i}] must be an object with string fields 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise DataError(
                f"{where}: messages[{i}] has the role {turn['role']!r}; a turn is one of {', '.join(map(repr, ROLES))}"
            )
        checked.append({"role": turn["role"], "content": turn["content"]})
    return checked


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, setting: bool | None) -> bool:
    """data.apply_chat_template: None means 'when the tokenizer has a template'."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting and not has_template:
        raise DataError(
            "data.apply_chat_template is true but the tokenizer has no chat template; "
            "set it to false or use a chat model"
        )
    return has_template if setting is None else setting


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    chat_template: bool,
    max_length: int,
    overflow: str = "truncate",
    warn: bool = True,
) -> list[int]:
    """Token ids of a prompt, ready for the response to follow (the generation prompt included).
    `warn=False`: a prompt cut to max_length is not logged (tether plan measures; the run warns)."""
    ids: Any
    if chat_template:
        ids = tokenizer.apply_chat_template(list(prompt.messages), add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding, older versions a list
            ids = ids["input_ids"]
    else:
        if len(prompt.messages) > 1:
            raise DataError("a multi-turn 'messages' prompt needs a chat template (data.apply_chat_template)")
        ids = tokenizer(prompt.text)["input_ids"]
    ids = [int(i) for i in ids]
    if len(ids) > max_length:
        if overflow == "error":
            raise DataError(
                f"prompt of {len(ids)} tokens is longer than data.max_prompt_length={max_length}: "
                f"{prompt.text[:80]!r}..."
            )
        if warn:
            log.warning("prompt of %d tokens cut to its last %d: %r...", len(ids), max_length, prompt.text[:60])
        ids = ids[-max_length:]  # keep the end: the generation prompt must stay intact
    return ids


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], config: PromptData) -> list[list[int]]:
    """Token ids of every prompt, with the data section's chat-template and length settings."""
    chat = uses_chat_template(tokenizer, config.apply_chat_template)
    return [encode_prompt(tokenizer, p, chat, config.max_prompt_length, config.prompt_overflow) for p in prompts]


class PromptSampler:
    """Batches of prompt indices: a fresh seeded shuffle each pass over the data.

    The position (pass, offset) is all the state there is, so a resumed run draws exactly the
    batches the uninterrupted run would have drawn.
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int) -> None:
        if num_prompts == 0:
            raise DataError("the prompt set is empty")
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.offset = 0

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_prompts, generator=generator).tolist()

    def next_batch(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.batch_size:
            order = self._order(self.epoch)
            take = order[self.offset : self.offset + self.batch_size - len(batch)]
            batch.extend(take)
            self.offset += len(take)
            if self.offset >= self.num_prompts:
                self.epoch, self.offset = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


# --------------------------------------------------------------------------------------------
# SFT examples and preference pairs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTExample:
    """A conversation to continue and the response to learn (the loss covers the response only)."""

    prompt: Prompt
    response: str


@dataclass(frozen=True)
class PreferencePair:
    """Two responses to one prompt, the first preferred; `margin` is how strongly (optional)."""

    prompt: Prompt
    chosen: str
    rejected: str
    margin: float = 0.0


def _text_field(record: dict[str, Any], name: str, where: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
    return value


def _record_prompt(record: dict[str, Any], where: str, expected: str) -> Prompt:
    if record.get("prompt") is not None:
        text = _text_field(record, "prompt", where)
        return Prompt(({"role": "user", "content": text},), text)
    if record.get("messages") is not None:
        messages = _check_messages(record["messages"], where)
        user_turns = [m["content"] for m in messages if m["role"] == "user"]
        return Prompt(tuple(messages), user_turns[-1] if user_turns else messages[-1]["content"])
    raise DataError(f"{where}: expected {expected}")


def load_sft_examples(path: str | Path) -> list[SFTExample]:
    """{"prompt": str, "response": str} or {"messages": [..., {"role": "assistant", ...}]} records.

    For a conversation, the final assistant turn is the response and everything before it the prompt.
    """
    examples = []
    unit = "line" if _is_json_lines(path) else "row"
    expected = "fields 'prompt' and 'response' (strings), or 'messages' ending with an assistant turn"
    for number, record in read_records(path):
        where = f"{path}, {unit} {number}"
        if record.get("prompt") is not None:
            prompt = _record_prompt(record, where, expected)
            examples.append(SFTExample(prompt, _text_field(record, "response", where)))
        elif record.get("messages") is not None:
            messages = _check_messages(record["messages"], where)
            if len(messages) < 2 or messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
                raise DataError(
                    f"{where}: field 'messages' must end with a non-empty assistant turn after at least one other turn"
                )
            context = messages[:-1]
            user_turns = [m["content"] for m in context if m["role"] == "user"]
            prompt = Prompt(tuple(context), user_turns[-1] if user_turns else context[-1]["content"])
            examples.append(SFTExample(prompt, messages[-1]["content"]))
        else:
            raise DataError(f"{where}: expected {expected}")
    return examples


def load_preferences(path: str | Path, with_margin: bool = False) -> list[PreferencePair]:
    """{"prompt": str | "messages": [...], "chosen": str, "rejected": str[, "margin": number]} records."""
    pairs = []
    identical: list[int] = []
    unit = "line" if _is_json_lines(path) else "row"
    expected = "a field 'prompt' (a string) or 'messages' (a list of turns), plus 'chosen' and 'rejected'"
    for number, record in read_records(path):
        where = f"{path}, {unit} {number}"
        prompt = _record_prompt(record, where, expected)
        chosen = _text_field(record, "chosen", where)
        rejected = _text_field(record, "rejected", where)
        margin = 0.0
        if with_margin:
            value = record.get("margin")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DataError(f"{where}: field 'margin' must be a finite number (rm.margin is on), got {value!r}")
            margin = float(value)
        if chosen.strip() == rejected.strip():
            identical.append(number)
            continue
        pairs.append(PreferencePair(prompt, chosen, rejected, margin))
    if identical:
        # The same response preferred over itself carries no signal, and its loss pulls toward a tie.
        log.warning(
            "%s: %d pair(s) whose chosen and rejected responses are the same are left out (%s %s)",
            path,
            len(identical),
            unit + "s" if len(identical) > 1 else unit,
            ", ".join(map(str, identical[:10])) + (" ..." if len(identical) > 10 else ""),
        )
    if not pairs:
        raise DataError(f"{path}: no preference pair is left: in every one, chosen and rejected are the same")
    return pairs


def encode_response(tokenizer: PreTrainedTokenizerBase, response: str, eos_id: int) -> list[int]:
    """A response's token ids as the model would emit them: the text, then its end-of-turn token."""
    ids = [int(i) for i in tokenizer(response, add_special_tokens=False)["input_ids"]]
    return ids + [eos_id]
