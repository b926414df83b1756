"""Prompt files, chat templates and the resumable prompt sampler (tether/data.py).

Tier: small files built in tmp_path, the 40-word tokenizer from tests/tiny_models.py. CPU, well under
a second apart from importing `datasets`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.tiny_models import make_tokenizer
from tether.data import (
    DataError,
    Prompt,
    PromptSampler,
    encode_prompt,
    load_prompts,
    read_records,
    shipped_data,
    uses_chat_template,
)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[object]) -> Path:
    return write_lines(path, [json.dumps(r) for r in records])


@pytest.fixture
def hf_datasets(tmp_path, monkeypatch):
    """The `datasets` library, its Arrow cache kept inside tmp_path."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    datasets.disable_progress_bars()
    return datasets


@pytest.fixture(scope="module")
def chat_tokenizer():
    return make_tokenizer(chat_template=True)


@pytest.fixture(scope="module")
def plain_tokenizer():
    return make_tokenizer(chat_template=False)


def user(text: str) -> Prompt:
    return Prompt(({"role": "user", "content": text},), text)


# --------------------------------------------------------------------------------------------
# read_records: JSON Lines
# --------------------------------------------------------------------------------------------


def test_jsonl_records_come_with_their_one_based_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}])
    assert read_records(path) == [(1, {"prompt": "a"}), (2, {"prompt": "b"}), (3, {"prompt": "c"})]


def test_jsonl_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", ["", "   ", '{"prompt": "a"}', "", '{"prompt": "b"}', ""])
    assert read_records(path) == [(3, {"prompt": "a"}), (5, {"prompt": "b"})]


def test_jsonl_error_after_blank_lines_names_the_true_line(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", ["", "", '{"prompt": "a"}', "", "{oops"])
    with pytest.raises(DataError, match=r"p\.jsonl, line 5"):
        read_records(path)


def test_missing_file_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl"):
        read_records(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file_is_a_data_error_naming_it(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=r"empty\.jsonl.*no records"):
        read_records(path)


@pytest.mark.parametrize("line", ['["a list"]', '"a string"', "42", "null"])
def test_non_object_json_line_is_a_data_error_naming_file_and_line(tmp_path, line):
    path = write_lines(tmp_path / "p.jsonl", ['{"prompt": "a"}', line])
    with pytest.raises(DataError, match=r"p\.jsonl, line 2: expected a JSON object"):
        read_records(path)


@pytest.mark.parametrize("line", ["{oops", '{"prompt": "a"', "prompt: a", '{"prompt": "a"} {"prompt": "b"}'])
def test_malformed_json_line_is_a_data_error_naming_file_and_line(tmp_path, line):
    path = write_lines(tmp_path / "p.jsonl", ['{"prompt": "a"}', '{"prompt": "b"}', line])
    with pytest.raises(DataError, match=r"p\.jsonl, line 3: not valid JSON"):
        read_records(path)


def test_non_utf8_file_is_a_data_error_naming_it(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl"):
        read_records(path)


# --------------------------------------------------------------------------------------------
# read_records: Parquet and datasets folders
# --------------------------------------------------------------------------------------------

ROWS = [{"prompt": "hello world"}, {"prompt": "tell me about the sun"}, {"prompt": "why"}]


def test_parquet_records_come_with_one_based_row_numbers(tmp_path, hf_datasets):
    path = tmp_path / "p.parquet"
    hf_datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    assert read_records(path) == [(i + 1, row) for i, row in enumerate(ROWS)]


def test_datasets_folder_records_come_with_one_based_row_numbers(tmp_path, hf_datasets):
    folder = tmp_path / "prompts_ds"
    hf_datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    assert read_records(folder) == [(i + 1, row) for i, row in enumerate(ROWS)]


def test_dataset_dict_folder_is_refused_naming_its_splits(tmp_path, hf_datasets):
    folder = tmp_path / "both"
    split = hf_datasets.Dataset.from_list(ROWS)
    hf_datasets.DatasetDict(train=split, test=split).save_to_disk(str(folder))
    with pytest.raises(DataError) as info:
        read_records(folder)
    message = str(info.value)
    assert str(folder) in message and "train" in message and "test" in message


def test_folder_that_is_not_a_dataset_is_a_data_error_naming_it(tmp_path, hf_datasets):
    folder = tmp_path / "just_a_folder"
    folder.mkdir()
    with pytest.raises(DataError, match="just_a_folder"):
        read_records(folder)


def test_corrupt_parquet_file_is_a_data_error_naming_it(tmp_path, hf_datasets):
    path = tmp_path / "bad.parquet"
    path.write_text("not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet"):
        read_records(path)


def test_parquet_messages_records_load_as_prompts(tmp_path, hf_datasets):
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "why"},
    ]
    path = tmp_path / "chat.parquet"
    hf_datasets.Dataset.from_list([{"messages": messages}]).to_parquet(str(path))
    (prompt,) = load_prompts(path)
    assert prompt.messages == tuple(messages) and prompt.text == "why"


def test_parquet_with_prompt_and_messages_columns_loads_rows_of_either_kind(tmp_path, hf_datasets):
    rows = [
        {"prompt": "hello", "messages": None},
        {"prompt": None, "messages": [{"role": "user", "content": "why"}]},
    ]
    path = tmp_path / "mixed.parquet"
    hf_datasets.Dataset.from_list(rows).to_parquet(str(path))
    assert [p.text for p in load_prompts(path)] == ["hello", "why"]


# --------------------------------------------------------------------------------------------
# load_prompts
# --------------------------------------------------------------------------------------------


def test_prompt_record_becomes_one_user_turn(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "tell me about the moon", "id": 7}])
    assert load_prompts(path) == [
        Prompt(({"role": "user", "content": "tell me about the moon"},), "tell me about the moon")
    ]


def test_messages_record_keeps_every_turn_and_its_text_is_the_last_user_turn(tmp_path):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "tell me about dogs"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": messages}])
    (prompt,) = load_prompts(path)
    assert prompt.messages == tuple(messages)
    assert prompt.text == "tell me about dogs"


def test_text_is_the_last_user_turn_even_when_an_assistant_turn_follows(tmp_path):
    messages = [
        {"role": "user", "content": "first"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "partial answer"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": messages}])
    assert load_prompts(path)[0].text == "second"


def test_extra_keys_in_a_turn_are_dropped(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "hi", "name": "x"}]}])
    assert load_prompts(path)[0].messages == ({"role": "user", "content": "hi"},)


@pytest.mark.parametrize(
    ("record", "field_name"),
    [
        ({"question": "why"}, "'prompt'"),  # neither field
        ({"prompt": ""}, "'prompt'"),
        ({"prompt": "   "}, "'prompt'"),
        ({"prompt": None}, "'prompt'"),
        ({"prompt": ["why"]}, "'prompt'"),
        ({"messages": "why"}, "'messages'"),
        ({"messages": []}, "'messages'"),
        ({"messages": {"role": "user", "content": "why"}}, "'messages'"),
        ({"messages": ["why"]}, "messages[0]"),
        ({"messages": [{"role": "user"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 3}]}, "messages[1]"),
    ],
)
def test_bad_prompt_record_is_a_data_error_naming_file_line_and_field(tmp_path, record, field_name):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, record])
    with pytest.raises(DataError) as info:
        load_prompts(path)
    message = str(info.value)
    assert f"{path}, line 2" in message
    assert field_name in message


# --------------------------------------------------------------------------------------------
# Chat templates and encoding
# --------------------------------------------------------------------------------------------


def test_uses_chat_template_auto_follows_the_tokenizer(chat_tokenizer, plain_tokenizer):
    assert uses_chat_template(chat_tokenizer, None) is True
    assert uses_chat_template(plain_tokenizer, None) is False


def test_uses_chat_template_explicit_settings(chat_tokenizer, plain_tokenizer):
    assert uses_chat_template(chat_tokenizer, True) is True
    assert uses_chat_template(chat_tokenizer, False) is False
    assert uses_chat_template(plain_tokenizer, False) is False


def test_uses_chat_template_true_without_a_template_is_a_data_error(plain_tokenizer):
    with pytest.raises(DataError, match="chat template"):
        uses_chat_template(plain_tokenizer, True)


def _template_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def test_encode_with_chat_template_equals_apply_chat_template_with_generation_prompt(chat_tokenizer):
    prompt = user("tell me about the sun")
    ids = encode_prompt(chat_tokenizer, prompt, chat_template=True, max_length=256)
    assert ids == _template_ids(chat_tokenizer, prompt.messages)
    assert ids[0] == chat_tokenizer.convert_tokens_to_ids("<|user|>")
    assert ids[-1] == chat_tokenizer.convert_tokens_to_ids("<|assistant|>")  # the generation prompt
    assert all(type(i) is int for i in ids)


def test_encode_multi_turn_with_chat_template(chat_tokenizer):
    messages = (
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "why"},
    )
    prompt = Prompt(messages, "why")
    assert encode_prompt(chat_tokenizer, prompt, True, 256) == _template_ids(chat_tokenizer, messages)


def test_encode_without_chat_template_is_plain_tokenization(chat_tokenizer, plain_tokenizer):
    prompt = user("tell me about the sun")
    for tokenizer in (chat_tokenizer, plain_tokenizer):
        ids = encode_prompt(tokenizer, prompt, chat_template=False, max_length=256)
        assert ids == tokenizer("tell me about the sun")["input_ids"]
        assert ids == tokenizer.convert_tokens_to_ids(["tell", "me", "about", "the", "sun"])


def test_encode_multi_turn_without_chat_template_is_a_data_error(plain_tokenizer):
    prompt = Prompt(({"role": "user", "content": "hi"}, {"role": "user", "content": "why"}), "why")
    with pytest.raises(DataError, match="chat template"):
        encode_prompt(plain_tokenizer, prompt, chat_template=False, max_length=256)


def test_too_long_prompt_is_truncated_from_the_left(chat_tokenizer, caplog):
    prompt = user("one two three four five")
    full = _template_ids(chat_tokenizer, prompt.messages)  # <|user|> one two three four five <|assistant|>
    with caplog.at_level(logging.WARNING, logger="tether.data"):
        ids = encode_prompt(chat_tokenizer, prompt, True, max_length=4, overflow="truncate")
    assert ids == full[-4:]
    assert ids[-1] == chat_tokenizer.convert_tokens_to_ids("<|assistant|>")  # generation prompt intact
    assert "cut" in caplog.text


def test_prompt_of_exactly_max_length_is_kept_whole(plain_tokenizer):
    ids = encode_prompt(plain_tokenizer, user("one two three"), False, max_length=3, overflow="error")
    assert len(ids) == 3


def test_too_long_prompt_with_overflow_error_is_a_data_error(plain_tokenizer):
    with pytest.raises(DataError, match=r"5 tokens.*max_prompt_length=4"):
        encode_prompt(plain_tokenizer, user("one two three four five"), False, max_length=4, overflow="error")


# --------------------------------------------------------------------------------------------
# PromptSampler
# --------------------------------------------------------------------------------------------


def draw(sampler: PromptSampler, batches: int) -> list[list[int]]:
    return [sampler.next_batch() for _ in range(batches)]


def test_each_pass_visits_every_prompt_exactly_once():
    num_prompts, batch_size = 10, 3
    flat = [i for batch in draw(PromptSampler(num_prompts, batch_size, seed=1), 10) for i in batch]
    assert len(flat) == 30
    for start in range(0, 30, num_prompts):
        assert sorted(flat[start : start + num_prompts]) == list(range(num_prompts))


def test_batches_crossing_a_pass_boundary_keep_batch_size():
    sampler = PromptSampler(num_prompts=5, batch_size=3, seed=0)
    batches = draw(sampler, 7)
    assert [len(b) for b in batches] == [3] * 7
    assert sampler.state_dict() == {"epoch": 4, "offset": 1}  # 21 prompts drawn = 4 passes + 1


def test_batch_larger_than_the_prompt_set_spans_several_passes():
    batch = PromptSampler(num_prompts=2, batch_size=5, seed=0).next_batch()
    assert len(batch) == 5
    assert sorted(batch[:2]) == [0, 1] and sorted(batch[2:4]) == [0, 1]


def test_each_pass_is_shuffled_afresh():
    sampler = PromptSampler(num_prompts=20, batch_size=20, seed=3)
    first, second = sampler.next_batch(), sampler.next_batch()
    assert first != second
    assert first != list(range(20))


def test_same_seed_gives_the_same_sequence():
    assert draw(PromptSampler(7, 3, seed=5), 10) == draw(PromptSampler(7, 3, seed=5), 10)


def test_different_seeds_give_different_orders():
    assert draw(PromptSampler(20, 4, seed=0), 5) != draw(PromptSampler(20, 4, seed=1), 5)


@pytest.mark.parametrize("drawn_before", [0, 1, 2, 3, 5])
def test_restored_sampler_continues_with_exactly_the_original_batches(drawn_before):
    original = PromptSampler(7, 3, seed=11)
    draw(original, drawn_before)
    state = original.state_dict()
    assert json.loads(json.dumps(state)) == state  # checkpointable as JSON

    restored = PromptSampler(7, 3, seed=11)
    restored.load_state_dict(state)
    assert draw(restored, 8) == draw(original, 8)


def test_empty_prompt_set_is_a_data_error():
    with pytest.raises(DataError, match="empty"):
        PromptSampler(0, 4, seed=0)


# --------------------------------------------------------------------------------------------
# Shipped data
# --------------------------------------------------------------------------------------------


def test_shipped_prompt_sets_load_and_are_non_empty():
    train = load_prompts(shipped_data("prompts.jsonl"))
    evals = load_prompts(shipped_data("eval_prompts.jsonl"))
    assert train and evals
    assert all(p.text.strip() for p in train + evals)


def test_no_eval_prompt_appears_in_the_training_prompts():
    train = {p.text.strip().lower() for p in load_prompts(shipped_data("prompts.jsonl"))}
    evals = [p.text.strip().lower() for p in load_prompts(shipped_data("eval_prompts.jsonl"))]
    assert not [text for text in evals if text in train]
    assert len(set(evals)) == len(evals)  # and the eval set has no duplicates of its own
