"""models/tokenizers.py against transformers 4.57.1: the same ids as the slow CLIPTokenizer (which the
pipeline used), CLIPTokenizerFast where it agrees with the slow one, and T5TokenizerFast.

Folders: the shipped assets/flux-emoji tokenizers, the demo writers' (models/demo_checkpoint.py), a CLIP
BPE trained here on captions (hundreds of merges built on each other, as in CLIP's real 49k), and
variants of special-token settings (a pad token inside / outside the vocabulary, a diffusers-style
added_tokens_decoder, left padding, T5 sentinels that transformers adds) and a T5 folder shaped like
FLUX.1-dev's (spiece.model + an older tokenizer.json + add_prefix_space, which makes T5TokenizerFast
rebuild itself from spiece.model).
"""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from models.demo_checkpoint import write_clip_tokenizer, write_t5_tokenizer
from models.tokenizers import CLIPTokenizer, T5Tokenizer, TokenizerFileError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "assets" / "flux-emoji"
LONG = ", ".join(["a small green koala on the left and a large red apple in the center"] * 12)

PROMPTS = [
    "a large red apple in the center, on a white background",
    "a koala on the left and a banana on the right, on a blue to yellow gradient background",
    "a small pizza at the top, on a black background",
    "an eggplant in the center, on an orange background",
    "",
    " ",
    "apple",
    LONG,
    "A LARGE RED APPLE In The Center",
    "Hello, World!!! (really?) -- yes; no: maybe... 'quoted' \"double\"",
    "it's the cat's toy, they're here, we've gone, I'm sure, you'll see, he'd go, DON'T SHOUT",
    "3 apples, 42 bananas, 2024-06-01, 3.14159, 1,000,000 and ½ ² ٣ Ⅻ",
    "naïve café résumé façade über Ångström",
    "nai\u0308ve cafe\u0301 (decomposed accents)",
    "ΟΔΟΣ ΣΙΣΥΦΟΣ and straße and İstanbul",
    "猫と犬が公園で遊んでいる",
    "一只红色的苹果",
    "한국어 문장 and русский текст",
    "🍎 🍌🍕 emoji 👍🏽 flags 🇺🇸 family 👨‍👩‍👧",
    "  extra   spaces   between\twords\t\tand tabs  ",
    "line one\nline two\r\nline three\n\n",
    "non\u00a0breaking\u2003em\u3000ideographic\u2028separator",
    "zero\u200bwidth soft\u00adhyphen bom\ufeff and nul\x00 replacement\ufffd",
    "&amp; &lt;tag&gt; &quot;quoted&quot; &#39;apos&#39; &nbsp;",
    "<b>bold</b> <i>html</i> tags",
    "a <|endoftext|> inside and <|startoftext|> too",
    "UPPER <|ENDOFTEXT|> special",
    "x<|endoftext|>y<|endoftext|><|endoftext|>",
    "ﬁne ligature and Ｆｕｌｌｗｉｄｔｈ letters",
    "email@example.com https://example.com/path?q=1&x=2 #hashtag @user",
    "$100 + 20% = ~€120 ^_^ `code` {braces} [brackets] |pipe| \\backslash",
    "a-b_c.d/e:f",
    "🍎" * 40,
    "word " * 100,
    "ʼmodifier apostrophe and ’curly’ quotes",
    "ǅ title case digraph and K kelvin and Ω ohm",
    "tab\tbetween\x1cfile separator\x85next line",
    "a" * 300,
]

# Prompts on which CLIPTokenizerFast differs from the slow CLIPTokenizer (and so from ours) on every
# vocabulary tested: str.lower's final sigma (fast: 'σ'), CJK ideographs (slow: one word each), control
# and format characters such as U+200B, U+00AD, U+FEFF, the zero-width joiner inside emoji sequences,
# U+001C and U+0085 (slow: dropped).
FAST_DIFFERS = {
    "ΟΔΟΣ ΣΙΣΥΦΟΣ and straße and İstanbul",
    "猫と犬が公園で遊んでいる",
    "一只红色的苹果",
    "🍎 🍌🍕 emoji 👍🏽 flags 🇺🇸 family 👨\u200d👩\u200d👧",
    "zero\u200bwidth soft\u00adhyphen bom\ufeff and nul\x00 replacement\ufffd",
    "tab\tbetween\x1cfile separator\x85next line",
}
# With added_tokens_decoder marking <|endoftext|> normalized=false (as several diffusers CLIP configs do), fast does not
# lowercase text before looking for it, so '<|ENDOFTEXT|>' is no eos token there (the slow one's is).
FAST_DIFFERS_ALSO = {"trained": {"UPPER <|ENDOFTEXT|> special"}}

CORPUS = PROMPTS + [
    "a photo of a cat sitting on a red sofa in a bright living room",
    "a painting of a dog running through a field of flowers at sunset",
    "the quick brown fox jumps over the lazy dog",
    "an astronaut riding a horse on the moon, digital art, highly detailed",
    "a bowl of fruit with apples, bananas, grapes and strawberries on a wooden table",
]


def bpe_merges(corpus: List[str], vocab_size: int) -> List[List[str]]:
    """Merges of a byte-level BPE with CLIP's '</w>' suffix, trained on `corpus` by the tokenizers library."""
    tokenizer = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>")
    tokenizer.train_from_iterator(corpus * 3, trainer)
    return [merge.split(" ") if isinstance(merge, str) else merge
            for merge in json.loads(tokenizer.to_str())["model"]["merges"]]


def write_trained_clip(folder: Path) -> None:
    """CLIP's vocabulary layout (bytes, bytes + '</w>', merge products, bos, eos) with trained merges,
    and diffusers-style configs: added_tokens_decoder and AddedToken dicts in special_tokens_map."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges = bpe_merges(CORPUS, 3000)
    tokens = list(dict.fromkeys(symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges]))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")

    def added(content, normalized):
        return dict(content=content, lstrip=False, normalized=normalized, rstrip=False, single_word=False)

    (folder / "special_tokens_map.json").write_text(json.dumps(dict(
        bos_token=added("<|startoftext|>", True), eos_token=added("<|endoftext|>", False),
        pad_token="<|endoftext|>", unk_token=added("<|endoftext|>", False))))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        add_prefix_space=False, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", do_lower_case=True, errors="replace", model_max_length=77,
        clean_up_tokenization_spaces=True, tokenizer_class="CLIPTokenizer",
        added_tokens_decoder={str(vocab[content]): dict(added(content, normalized), special=True)
                              for content, normalized in (("<|startoftext|>", True), ("<|endoftext|>", False))})))


def with_config(source: Path, target: Path, **changes) -> Path:
    """A copy of a tokenizer folder with tokenizer_config.json and special_tokens_map.json keys changed
    (None removes a key)."""
    shutil.copytree(source, target)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = target / name
        if path.is_file():
            config = json.loads(path.read_text())
            for key, value in changes.items():
                if value is None:
                    config.pop(key, None)
                elif name == "tokenizer_config.json" or key in config:
                    config[key] = value
            path.write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """name -> (CLIP folder or None, T5 folder or None)."""
    tmp = tmp_path_factory.mktemp("tokenizers")
    write_clip_tokenizer(tmp / "demo")
    write_t5_tokenizer(tmp / "demo")
    write_trained_clip(tmp / "trained")
    clip = SHIPPED / "tokenizer"
    return {
        "shipped": (clip, SHIPPED / "tokenizer_2"),
        "demo": (tmp / "demo" / "tokenizer", tmp / "demo" / "tokenizer_2"),
        "trained": (tmp / "trained", None),
        # SD2-style pad token: a vocabulary symbol, which the slow tokenizer also cuts out of the text.
        "pad_in_vocab": (with_config(clip, tmp / "pad_in_vocab", pad_token="!"), None),
        # A pad token outside the vocabulary gets the next id; padding on the left.
        "pad_added": (with_config(clip, tmp / "pad_added", pad_token="<|pad|>", padding_side="left"), None),
        # No extra_ids setting: T5TokenizerFast adds <extra_id_0..99> after the vocabulary.
        "t5_sentinels": (None, with_config(SHIPPED / "tokenizer_2", tmp / "t5_sentinels", extra_ids=None,
                                           additional_special_tokens=None)),
    }


@pytest.fixture(scope="module")
def references():
    """transformers' tokenizer classes (imported here only: the module under test must not need them)."""
    from transformers import CLIPTokenizer as SlowCLIP
    from transformers import CLIPTokenizerFast, T5TokenizerFast
    from transformers.models.clip.tokenization_clip import BasicTokenizer

    def slow_clip(folder):
        tokenizer = SlowCLIP.from_pretrained(str(folder), local_files_only=True)
        if tokenizer.fix_text is not None:  # ftfy installed: compare with the path this project uses
            tokenizer.fix_text, tokenizer.nlp = None, BasicTokenizer(strip_accents=False, do_split_on_punc=False)
        return tokenizer

    return dict(slow=slow_clip,
                fast=lambda folder: CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True),
                t5=lambda folder: T5TokenizerFast.from_pretrained(str(folder), local_files_only=True))


def assert_same_calls(ours, reference, prompts: List[str], lengths: List[int]) -> None:
    """Unpadded ids (as warn_truncated asks), then padded + truncated int64 arrays (as encode_prompt asks),
    for the whole batch and for each prompt alone."""
    for texts in [prompts] + [[prompt] for prompt in prompts]:
        assert ours(texts, truncation=False).input_ids == reference(texts, truncation=False).input_ids, texts
    for length in lengths:
        got = ours(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np")
        want = reference(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np")
        assert got.input_ids.dtype == np.int64 and got.input_ids.shape == (len(prompts), length)
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        np.testing.assert_array_equal(got.attention_mask, want.attention_mask)


CLIP_FOLDERS = ["shipped", "demo", "trained", "pad_in_vocab", "pad_added"]


@pytest.mark.parametrize("name", CLIP_FOLDERS)
def test_clip_matches_slow_tokenizer(name, folders, references):
    folder = folders[name][0]
    ours, slow = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True), references["slow"](folder)
    assert ours.model_max_length == slow.model_max_length == 77
    assert ours.pad_token_id == slow.pad_token_id
    assert_same_calls(ours, slow, PROMPTS, [77, 20, 3])
    # padding=True pads to the batch's longest; single strings give one flat list, as in transformers.
    assert ours(PROMPTS[:4], padding=True).input_ids == slow(PROMPTS[:4], padding=True).input_ids
    assert ours(PROMPTS[0]).input_ids == slow(PROMPTS[0]).input_ids


def test_clip_long_prompts_truncate_to_77_keeping_bos_and_eos(folders, references):
    ours = CLIPTokenizer.from_pretrained(SHIPPED / "tokenizer")
    ids = ours([LONG, "a" * 300], padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    assert ids.shape == (2, 77) and (ids[:, 0] == 757).all() and (ids[:, -1] == 758).all()
    assert [len(row) > 77 for row in ours([LONG, "apple"], truncation=False).input_ids] == [True, False]


@pytest.mark.parametrize("name", ["shipped", "trained"])
def test_clip_random_text_matches_slow_tokenizer(name, folders, references):
    """Random strings over the characters where tokenizers tend to differ."""
    folder = folders[name][0]
    ours, slow = CLIPTokenizer.from_pretrained(folder), references["slow"](folder)
    pool = list("abcXYZ 019!?.,'\"<>|&;:-_") + [
        "<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "'s", "'LL", "\n", "\t", "\r", "\u00a0", "\u2028",
        "\u3000", "\x1c", "\x85", "\u200b", "\u00ad", "\ufeff", "\x00", "\ufffd", "\u0301", "\u0345", "é", "É",
        "ß", "İ", "Σ", "ﬁ", "Ⅻ", "²", "½", "٣", "猫", "と", "한", "🍎", "👍🏽", "\U0001F1FA\U0001F1F8", "\U00020000",
        "ǅ", "ῼ", "K", "Ω", "ΐ", "the ", "apple", "koala"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 12))) for _ in range(1500)]
    assert ours(texts).input_ids == slow(texts).input_ids


@pytest.mark.parametrize("name", ["shipped", "demo", "trained"])
def test_clip_fast_tokenizer_differs_only_where_documented(name, folders, references):
    """CLIPTokenizerFast gives our (= the slow tokenizer's) ids on every prompt but FAST_DIFFERS."""
    folder = folders[name][0]
    ours, fast = CLIPTokenizer.from_pretrained(folder), references["fast"](folder)
    differing = {prompt for prompt in PROMPTS if ours([prompt]).input_ids != fast([prompt]).input_ids}
    expected = FAST_DIFFERS | FAST_DIFFERS_ALSO.get(name, set())
    assert differing == expected
    assert_same_calls(ours, fast, [prompt for prompt in PROMPTS if prompt not in expected], [77])


@pytest.mark.parametrize("name,lengths", [("shipped", [32, 512, 8]), ("demo", [512, 77, 8]),
                                          ("t5_sentinels", [32, 8])])
def test_t5_matches_fast_tokenizer(name, lengths, folders, references):
    folder = folders[name][1]
    ours, fast = T5Tokenizer.from_pretrained(str(folder), local_files_only=True), references["t5"](folder)
    assert ours.model_max_length == fast.model_max_length and ours.pad_token_id == fast.pad_token_id == 0
    prompts = PROMPTS + ["sentinels <extra_id_0> and <extra_id_99> and </s> <pad> <unk> inside"]
    assert_same_calls(ours, fast, prompts, lengths)
    assert ours(prompts[:4], padding=True).input_ids == fast(prompts[:4], padding=True).input_ids
    # Truncation keeps the final </s>.
    ids = ours([LONG], padding="max_length", max_length=8, truncation=True, return_tensors="np").input_ids
    assert ids[0, -1] == fast.eos_token_id == 1


def write_flux_dev_style_t5(folder: Path) -> None:
    """tokenizer_2/ shaped like FLUX.1-dev's (t5-v1_1-xxl's): a SentencePiece spiece.model, a tokenizer.json
    of the older layout (charsmap normalizer, whitespace split + Metaspace) with 100 sentinels counting
    down after the pieces, and configs with add_prefix_space, extra_ids and added_tokens_decoder, which
    make T5TokenizerFast rebuild itself from spiece.model."""
    import io

    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, decoders, processors

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=300, model_type="unigram",
        character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    sentinels = [f"<extra_id_{index}>" for index in range(100)]
    tokenizer = Tokenizer(models.Unigram([(piece.piece, piece.score) for piece in proto.pieces]
                                         + [(token, 0.0) for token in reversed(sentinels)], unk_id=2))
    tokenizer.normalizer = normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    tokenizer.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                             special_tokens=[("</s>", 1)])
    tokenizer.decoder = decoders.Metaspace()
    specials = ["<pad>", "</s>", "<unk>"] + list(reversed(sentinels))
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in specials])
    tokenizer.save(str(folder / "tokenizer.json"))
    flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False)
    added = {str(tokenizer.token_to_id(token)): dict(flags, content=token, special=True) for token in specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        add_prefix_space=True, added_tokens_decoder=added, additional_special_tokens=sentinels,
        clean_up_tokenization_spaces=True, eos_token="</s>", extra_ids=100, legacy=True, model_max_length=512,
        pad_token="<pad>", sp_model_kwargs={}, tokenizer_class="T5Tokenizer", unk_token="<unk>")))
    (folder / "special_tokens_map.json").write_text(json.dumps(dict(
        additional_special_tokens=sentinels, eos_token=dict(flags, content="</s>"),
        pad_token=dict(flags, content="<pad>"), unk_token=dict(flags, content="<unk>"))))


@pytest.mark.parametrize("add_prefix_space,legacy", [(True, True), (False, True), (True, False)])
def test_t5_flux_dev_style_folder_matches_fast_tokenizer(add_prefix_space, legacy, tmp_path, references):
    """With add_prefix_space set, T5TokenizerFast converts spiece.model; ours reads tokenizer.json and
    takes the converted text handling (models.tokenizers.as_converted_from_spiece)."""
    write_flux_dev_style_t5(tmp_path / "tokenizer_2")
    config_path = tmp_path / "tokenizer_2" / "tokenizer_config.json"
    config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()), add_prefix_space=add_prefix_space,
                                           legacy=legacy)))
    ours, fast = T5Tokenizer.from_pretrained(tmp_path / "tokenizer_2"), references["t5"](tmp_path / "tokenizer_2")
    prompts = PROMPTS + ["sentinels <extra_id_0> and <extra_id_99> and </s> <pad> <unk> inside", "a\u2581b \u2581x"]
    assert_same_calls(ours, fast, prompts, [512, 77, 8])
    pool = list("abcXYZ 019!?.,'\"<>|&;:-_") + [
        "</s>", "<pad>", "<extra_id_3>", "\n", "\t", "\u00a0", "\u2028", "\u3000", "\x1c", "\x85", "\u200b", "\u00ad",
        "\ufeff", "\u0301", "é", "ß", "İ", "Σ", "ﬁ", "Ⅻ", "²", "½", "猫", "한", "🍎", "\u2581", "  ", "the ", "apple"]
    rng = random.Random(1)
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 12))) for _ in range(1000)]
    assert ours(texts).input_ids == fast(texts).input_ids


def test_t5_sentinels_are_added_after_the_vocabulary(folders):
    ours = T5Tokenizer.from_pretrained(folders["t5_sentinels"][1])
    size = Tokenizer.from_file(str(SHIPPED / "tokenizer_2" / "tokenizer.json")).get_vocab_size(with_added_tokens=False)
    assert ours(["<extra_id_0>"]).input_ids == [[size, 1]]


def test_pipeline_calls(folders):
    """The two calls pipeline_flux makes: unpadded lists to count tokens, padded int64 arrays to encode."""
    clip = CLIPTokenizer.from_pretrained(str(SHIPPED / "tokenizer"), local_files_only=True)
    t5 = T5Tokenizer.from_pretrained(str(SHIPPED / "tokenizer_2"), local_files_only=True)
    prompts = ["a large red apple in the center, on a white background", ""]
    counted = clip(prompts, truncation=False).input_ids
    assert isinstance(counted, list) and [len(ids) for ids in counted] == [19, 2]
    padded = t5(prompts, padding="max_length", max_length=t5.model_max_length, truncation=True, return_tensors="np")
    assert padded.input_ids.shape == (2, 32) and padded.input_ids.dtype == np.int64
    assert padded["input_ids"] is padded.input_ids
    with pytest.raises(ValueError, match="different lengths"):
        t5(prompts, return_tensors="np")
    with pytest.raises(ValueError, match="return_tensors"):
        t5(prompts, return_tensors="pt")


def test_import_needs_neither_transformers_nor_torch():
    code = ("import sys, time; start = time.perf_counter(); import models.tokenizers; "
            "print(time.perf_counter() - start); "
            "print(sorted({name.split('.')[0] for name in sys.modules} & {'transformers', 'torch', 'mindspore'}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    seconds, loaded = result.stdout.split("\n")[:2]
    assert loaded == "[]", result.stdout
    print(f"import models.tokenizers: {float(seconds):.3f} s")


def broken_copy(tmp_path: Path, folder: Path, remove: str = None, config: dict = None) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    if remove:
        (target / remove).unlink()
    if config is not None:
        (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("cls,folder,missing", [
    (CLIPTokenizer, "tokenizer", "vocab.json"), (CLIPTokenizer, "tokenizer", "merges.txt"),
    (CLIPTokenizer, "tokenizer", "tokenizer_config.json"), (T5Tokenizer, "tokenizer_2", "tokenizer.json"),
    (T5Tokenizer, "tokenizer_2", "tokenizer_config.json"),
])
def test_missing_file_is_named(cls, folder, missing, tmp_path):
    target = broken_copy(tmp_path, SHIPPED / folder, remove=missing)
    with pytest.raises(FileNotFoundError, match=f"{target / missing} is missing"):
        cls.from_pretrained(target)


@pytest.mark.parametrize("cls,folder", [(CLIPTokenizer, "tokenizer"), (T5Tokenizer, "tokenizer_2")])
def test_missing_model_max_length_is_named(cls, folder, tmp_path):
    config = json.loads((SHIPPED / folder / "tokenizer_config.json").read_text())
    del config["model_max_length"]
    target = broken_copy(tmp_path, SHIPPED / folder, config=config)
    with pytest.raises(TokenizerFileError, match=f"{target / 'tokenizer_config.json'} lacks model_max_length"):
        cls.from_pretrained(target)
    target = broken_copy(tmp_path / "zero", SHIPPED / folder, config=dict(config, model_max_length=0))
    with pytest.raises(TokenizerFileError, match="model_max_length must be a positive integer"):
        cls.from_pretrained(target)


def test_damaged_files_are_named(tmp_path):
    target = broken_copy(tmp_path, SHIPPED / "tokenizer")
    (target / "merges.txt").write_text("#version: 0.2\nk o\nko\n")
    with pytest.raises(TokenizerFileError, match=r"merges.txt line 3 is not a merge"):
        CLIPTokenizer.from_pretrained(target)
    (target / "vocab.json").write_text('{"a": 0, "b"')
    with pytest.raises(TokenizerFileError, match=r"vocab.json is not valid JSON"):
        CLIPTokenizer.from_pretrained(target)
    target = broken_copy(tmp_path, SHIPPED / "tokenizer_2")
    (target / "tokenizer.json").write_text('{"version": "1.0"')
    with pytest.raises(TokenizerFileError, match=r"tokenizer.json cannot be read as a tokenizer"):
        T5Tokenizer.from_pretrained(target)
