"""FLUX's two prompt tokenizers without transformers: CLIP's byte-level BPE and T5's Unigram.

`from transformers import CLIPTokenizer, T5TokenizerFast` costs seconds at start-up (transformers imports
torch when it is installed); these classes read the same diffusers folders (`tokenizer/`, `tokenizer_2/`)
with the `tokenizers` Rust library and the `regex` module (both transformers dependencies, each imported
in tens of milliseconds) and give the ids transformers 4.57.1 gives, called the way pipeline_flux calls
them: `tokenizer(prompts, padding="max_length", max_length=N, truncation=True, return_tensors="np").input_ids`
and `tokenizer(prompts, truncation=False).input_ids`.

`CLIPTokenizer` reproduces transformers' *slow* CLIPTokenizer (the one the pipeline used), not
CLIPTokenizerFast, which differs from the slow one on some text (see the class docstring).
`T5Tokenizer` is T5TokenizerFast: the folder's tokenizer.json run by the same Rust library.

This module imports neither transformers nor torch (tests/test_tokenizers.py checks it in a fresh interpreter).
"""

import unicodedata
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import regex
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .checkpoint_files import RESTORE, read_json_object

# CLIPTokenizer reads at most this many merges (49152 tokens - 256 bytes - 2 specials; the first line
# of merges.txt is a '#version' header it skips).
CLIP_MAX_MERGES = 49152 - 256 - 2
# transformers' CLIPTokenizer pre-tokenizer, compiled with the `regex` module and IGNORECASE as there.
CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# Words CLIPTokenizer's BPE cache returns unchanged (no BPE, no '</w>').
CLIP_UNSPLIT = ("<|startoftext|>", "<|endoftext|>")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TextInput = Union[str, Sequence[str]]


class TokenizerFileError(ValueError):
    """A tokenizer folder exists but one of its files is unreadable or lacks a setting the pipeline needs."""


def read_json(path: Path) -> dict:
    return read_json_object(path, TokenizerFileError)


def read_settings(folder: Path) -> Tuple[dict, int]:
    """tokenizer_config.json with special_tokens_map.json (optional) laid over it, as transformers'
    from_pretrained merges them, and model_max_length (required: the pipeline pads prompts to it;
    transformers' default when it is absent is 10**30)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    path = folder / "tokenizer_config.json"
    settings = read_json(path)
    if "model_max_length" not in settings:
        raise TokenizerFileError(f"{path} lacks model_max_length (the pipeline pads prompts to it); {RESTORE}")
    max_length = settings["model_max_length"]
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
        raise TokenizerFileError(f"{path}: model_max_length must be a positive integer, got {max_length!r}; {RESTORE}")
    if (folder / "special_tokens_map.json").is_file():
        for key, value in read_json(folder / "special_tokens_map.json").items():
            if key == "additional_special_tokens" and isinstance(value, list):
                tokens = list(settings.get("additional_special_tokens") or [])
                value = tokens + [token for token in value if token not in tokens]
            settings[key] = value
    return settings, max_length


def token_content(token: Union[None, str, dict]) -> Optional[str]:
    """A special token as tokenizer files write it: a string, or an AddedToken dict with its `content`."""
    return token.get("content") if isinstance(token, dict) else token


def special_tokens(settings: dict, defaults: Dict[str, str]) -> Tuple[Dict[str, dict], List[str]]:
    """{content: AddedToken flags} of the special tokens, in transformers' order (bos, eos, unk, sep, pad,
    cls, mask, additional), and their contents in that order without repeats."""
    specs = [settings.get(key, defaults.get(key)) for key in SPECIAL_KEYS]
    specs += list(settings.get("additional_special_tokens") or [])
    flags: Dict[str, dict] = {}
    for spec in specs:
        content = token_content(spec)
        if content:
            flags.setdefault(content, spec if isinstance(spec, dict) else {})
    return flags, list(flags)


def validate_call(padding, truncation, return_tensors) -> Tuple[str, bool]:
    """transformers' padding/truncation arguments as ("no"|"longest"|"max_length", truncate?)."""
    if return_tensors not in (None, "np"):
        raise ValueError(f"return_tensors={return_tensors!r} is not supported: use 'np' or None")
    pad = {False: "no", None: "no", "do_not_pad": "no", True: "longest", "longest": "longest",
           "max_length": "max_length"}.get(padding)
    if pad is None:
        raise ValueError(f"padding={padding!r}: use False, True, 'longest' or 'max_length'")
    if truncation not in (None, False, True, "longest_first", "only_first", "do_not_truncate"):
        raise ValueError(f"truncation={truncation!r}: use True or False")
    return pad, truncation not in (None, False, "do_not_truncate")


class TokenizedBatch:
    """What transformers' BatchEncoding gives the pipeline: `input_ids` and `attention_mask` (also by key)."""

    def __init__(self, input_ids, attention_mask):
        self.input_ids = input_ids
        self.attention_mask = attention_mask

    def __getitem__(self, key: str):
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}[key]

    def keys(self):
        return ["input_ids", "attention_mask"]


class PromptTokenizer:
    """Padding and the call signature shared by both tokenizers; subclasses encode a batch of texts."""

    model_max_length: int
    pad_token_id: int
    padding_side: str = "right"
    truncation_side: str = "right"

    def encode_batch(self, texts: List[str], max_length: Optional[int]) -> List[List[int]]:
        """Each text's ids with its special tokens, cut to `max_length` (None: uncut)."""
        raise NotImplementedError

    def __call__(self, text: TextInput, padding: Union[bool, str] = False, truncation: Union[None, bool, str] = None,
                 max_length: Optional[int] = None, return_tensors: Optional[str] = None, **kwargs) -> TokenizedBatch:
        """Token ids of each text, with the model's special tokens. `padding="max_length"` pads to
        `max_length` (default model_max_length), `padding=True` to the longest text; `truncation=True` cuts
        each to `max_length` (default model_max_length) keeping the special tokens; `max_length` alone
        truncates, as transformers does. With `return_tensors="np"`: int64 arrays (batch, length)."""
        unknown = set(kwargs) - {"add_special_tokens", "verbose"}
        if unknown or not kwargs.get("add_special_tokens", True):
            raise TypeError(f"unsupported tokenizer arguments: {sorted(unknown) or ['add_special_tokens=False']}")
        pad, truncate = validate_call(padding, truncation, return_tensors)
        if max_length is not None and padding is False and truncation is None:
            truncate = True  # transformers' backward-compatible default
        if max_length is None and (pad == "max_length" or truncate):
            max_length = self.model_max_length
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not texts or not all(isinstance(item, str) for item in texts):
            raise TypeError("the tokenizer takes a string or a non-empty list of strings")
        ids = self.encode_batch(texts, max_length if truncate else None)
        if pad != "no":
            length = max_length if pad == "max_length" else max(len(row) for row in ids)
            ids, masks = (list(rows) for rows in zip(*(self.pad(row, length) for row in ids)))
        else:
            masks = [[1] * len(row) for row in ids]
        if return_tensors == "np":
            if len({len(row) for row in ids}) > 1:
                raise ValueError("the texts tokenize to different lengths: pad them (padding='max_length' "
                                 "with truncation=True) to get an array")
            return TokenizedBatch(np.array(ids, dtype=np.int64), np.array(masks, dtype=np.int64))
        return TokenizedBatch(ids[0], masks[0]) if single else TokenizedBatch(ids, masks)

    def pad(self, ids: List[int], length: int) -> Tuple[List[int], List[int]]:
        fill = max(length - len(ids), 0)
        if self.padding_side == "left":
            return [self.pad_token_id] * fill + ids, [0] * fill + [1] * len(ids)
        return ids + [self.pad_token_id] * fill, [1] * len(ids) + [0] * fill


# ----- CLIP -----

def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2/CLIP's map of the 256 bytes to printable characters (the BPE's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, characters)))


BYTE_ENCODER = bytes_to_unicode()


def is_whitespace(char: str) -> bool:
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def is_control(char: str) -> bool:
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def is_cjk(code: int) -> bool:
    """The CJK Unified Ideographs blocks BERT's BasicTokenizer puts spaces around."""
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF
            or 0x2A700 <= code <= 0x2B73F or 0x2B740 <= code <= 0x2B81F or 0x2B820 <= code <= 0x2CEAF
            or 0xF900 <= code <= 0xFAFF or 0x2F800 <= code <= 0x2FA1F)


def clip_clean(text: str) -> str:
    """The text cleaning of transformers' CLIPTokenizer without ftfy: BERT's BasicTokenizer with
    strip_accents=False and no punctuation split. Drops NUL, U+FFFD and control/format characters, turns
    whitespace into spaces, puts spaces around CJK ideographs, NFC-normalizes, collapses whitespace and
    lowercases each word (Python's str.lower, so a word-final Σ becomes ς)."""
    cleaned = []
    for char in text:
        code = ord(char)
        if code == 0 or code == 0xFFFD or is_control(char):
            continue
        cleaned.append(" " if is_whitespace(char) else f" {char} " if is_cjk(code) else char)
    words = [word.lower() for word in unicodedata.normalize("NFC", "".join(cleaned)).split()]
    return " ".join(" ".join(words).split())


def read_merges(path: Path) -> List[Tuple[str, str]]:
    """merges.txt as CLIPTokenizer reads it: first line skipped, at most CLIP_MAX_MERGES pairs, a repeated
    pair ranked at its last line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the CLIP tokenizer needs its BPE merges; {RESTORE}")
    try:
        lines = path.read_text(encoding="utf-8").strip().split("\n")[1:CLIP_MAX_MERGES + 1]
    except UnicodeDecodeError as error:
        raise TokenizerFileError(f"{path} is not UTF-8 text ({error}); {RESTORE}") from error
    ranks: Dict[Tuple[str, str], int] = {}
    for number, line in enumerate(lines, start=2):
        pair = tuple(line.split())
        if len(pair) != 2:
            raise TokenizerFileError(f"{path} line {number} is not a merge of two symbols: {line!r}; {RESTORE}")
        ranks[pair] = number
    return sorted(ranks, key=ranks.__getitem__)


class CLIPTokenizer(PromptTokenizer):
    """transformers' slow CLIPTokenizer (4.57.1, without ftfy) on the `tokenizers` library's BPE.

    The BPE is the one transformers' CLIPConverter builds (vocab.json, merges.txt, '</w>' end-of-word
    suffix, unknown symbols as unk_token); the text around it is the slow tokenizer's, ported:
    special tokens (bos, eos, unk, pad, additional ones, tokenizer_config's added_tokens_decoder) are cut
    out of the raw text first and keep their ids, the rest is cleaned by `clip_clean` and split by
    CLIP's regex (the `regex` module, as in transformers), then byte-encoded and merged. Each text gets
    bos ... eos; truncation keeps both; padding uses pad_token.

    Where CLIPTokenizerFast differs from the slow tokenizer this one follows the slow one (all checked
    by tests/test_tokenizers.py): 'ΟΔΟΣ' (str.lower gives a word-final 'ς', fast lowercases letter by
    letter to 'σ'); CJK ideographs, which the slow one makes one word each ('一只' -> two words, fast:
    one); control and format characters such as U+200B, U+00AD, U+FEFF, U+001C, U+0085 and the zero-width
    joiner inside emoji sequences (man ZWJ woman), which the slow one drops and fast keeps as symbols;
    and '<|ENDOFTEXT|>' typed in a prompt, which the slow one lowercases into the eos token while fast,
    when added_tokens_decoder marks that token normalized=false, does not.

    Known limits, none met by prompts in practice: when `ftfy` is installed transformers' slow
    CLIPTokenizer cleans text with ftfy.fix_text instead (not in this project's requirements, so not
    mirrored); a vocabulary lacking a symbol that a merge builds from is tokenized as the Rust BPE does
    (unknown symbol, no merge) where the slow one would merge it; special tokens that are prefixes of
    each other are matched longest-first rather than by transformers' trie.
    """

    def __init__(self, vocab: Dict[str, int], merges: List[Tuple[str, str]], settings: dict, model_max_length: int):
        self.model_max_length = model_max_length
        self.padding_side = settings.get("padding_side", "right")
        self.truncation_side = settings.get("truncation_side", "right")
        defaults = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                        pad_token="<|endoftext|>")
        flags, specials = special_tokens(settings, defaults)
        # Added tokens: ids from added_tokens_decoder, else the vocabulary, else appended in order.
        self.added: Dict[str, int] = {}
        for index, spec in sorted((int(index), spec) for index, spec in
                                  (settings.get("added_tokens_decoder") or {}).items()):
            self.added[spec["content"]] = index
            flags[spec["content"]] = spec
        next_id = len(vocab.keys() | self.added.keys())  # len(get_vocab()) in transformers
        for content in specials:
            if content not in self.added:
                self.added[content] = vocab[content] if content in vocab else next_id
                next_id += content not in vocab
        self.flags = {content: flags.get(content, {}) for content in self.added}
        self.vocab = vocab
        self.unk_token = token_content(settings.get("unk_token", defaults["unk_token"]))
        self.unk_id = vocab.get(self.unk_token, self.added.get(self.unk_token))
        self.bos_token_id = self.added[token_content(settings.get("bos_token", defaults["bos_token"]))]
        self.eos_token_id = self.added[token_content(settings.get("eos_token", defaults["eos_token"]))]
        self.pad_token_id = self.added[token_content(settings.get("pad_token", defaults["pad_token"]))]
        self.split_pattern = regex.compile("|".join(regex.escape(token) for token in
                                                    sorted(self.added, key=len, reverse=True)))
        self.bpe = BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                       end_of_word_suffix="</w>", fuse_unk=False,
                       unk_token=self.unk_token if self.unk_token in vocab else None)

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], local_files_only: bool = True) -> "CLIPTokenizer":
        """Read a diffusers FLUX `tokenizer/` folder: vocab.json, merges.txt, tokenizer_config.json
        (with model_max_length) and, if present, special_tokens_map.json."""
        folder = Path(folder)
        settings, max_length = read_settings(folder)
        vocab = read_json(folder / "vocab.json")
        if not all(isinstance(index, int) and not isinstance(index, bool) for index in vocab.values()):
            raise TokenizerFileError(f"{folder / 'vocab.json'} is not a token -> id vocabulary (some ids are not "
                                     f"integers); {RESTORE}")
        merges = read_merges(folder / "merges.txt")
        try:
            return cls(vocab, merges, settings, max_length)
        except Exception as error:  # tokenizers raises a plain Exception for a merge outside the vocabulary
            if isinstance(error, (TokenizerFileError, FileNotFoundError)):
                raise
            raise TokenizerFileError(f"{folder}: vocab.json, merges.txt and the special tokens of "
                                     f"tokenizer_config.json do not fit together ({error!r}); {RESTORE}") from error

    def token_id(self, token: str) -> int:
        return self.added[token] if token in self.added else self.vocab.get(token, self.unk_id)

    def pieces(self, text: str) -> List[str]:
        """The text cut around its special tokens, with their lstrip/rstrip/single_word flags applied
        (transformers' PreTrainedTokenizer.tokenize)."""
        pieces: List[str] = []
        position = 0
        for match in self.split_pattern.finditer(text):
            pieces += [text[position:match.start()], match.group()]
            position = match.end()
        pieces.append(text[position:])
        for index in range(1, len(pieces), 2):  # odd places hold the special tokens
            flags, token = self.flags[pieces[index]], pieces[index]
            left, right = pieces[index - 1], pieces[index + 1]
            if flags.get("rstrip") and right:
                pieces[index + 1] = right.lstrip()
            if flags.get("lstrip") and left:
                pieces[index - 1] = left.rstrip()
            if flags.get("single_word") and left and left[-1] != " ":
                pieces[index - 1] += token
                pieces[index] = ""
            elif flags.get("single_word") and right and right[0] != " ":
                pieces[index + 1] = token + pieces[index + 1]
                pieces[index] = ""
        return pieces

    def encode(self, text: str) -> List[int]:
        """Token ids of one text, without bos/eos."""
        ids = []
        for index, piece in enumerate(self.pieces(text)):
            if not piece:
                continue
            if index % 2 and piece in self.added:
                ids.append(self.added[piece])
                continue
            for word in CLIP_PATTERN.findall(clip_clean(piece)):
                word = "".join(BYTE_ENCODER[byte] for byte in word.encode("utf-8"))
                tokens = [word] if word in CLIP_UNSPLIT else [token.value for token in self.bpe.tokenize(word)]
                ids += [self.token_id(token) for token in tokens]
        return ids

    def encode_batch(self, texts: List[str], max_length: Optional[int]) -> List[List[int]]:
        rows = []
        for text in texts:
            ids = self.encode(text)
            if max_length is not None and len(ids) + 2 > max_length:
                if max_length < 2:
                    raise ValueError(f"max_length={max_length} leaves no room for CLIP's bos and eos tokens")
                keep = max_length - 2
                ids = ids[len(ids) - keep:] if self.truncation_side == "left" else ids[:keep]
            rows.append([self.bos_token_id] + ids + [self.eos_token_id])
        return rows


# ----- T5 -----

def as_converted_from_spiece(tokenizer: Tokenizer, settings: dict) -> None:
    """Give `tokenizer` the normalizer and pre-tokenizer that T5TokenizerFast builds when tokenizer_config
    sets add_prefix_space (FLUX.1-dev's does): transformers then ignores tokenizer.json and converts
    spiece.model (SpmConverter), whose pieces are tokenizer.json's vocabulary but whose text handling is
    the newer one: the charsmap normalizer, then right strip and runs of spaces as one '▁', then Metaspace
    (prepend '▁' always; 'first' for legacy=false; never for add_prefix_space=false). Older tokenizer.json
    files (t5-v1_1's) split on whitespace instead, which differs on rare characters such as U+0085."""
    steps = [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "\u2581")]
    tokenizer.normalizer = normalizers.Sequence(([tokenizer.normalizer] if tokenizer.normalizer else []) + steps)
    if not settings["add_prefix_space"]:
        scheme = "never"
    else:
        scheme = "always" if settings.get("legacy", True) is not False else "first"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme)


class T5Tokenizer(PromptTokenizer):
    """transformers' T5TokenizerFast: the folder's tokenizer.json (normalizer, Unigram model and the
    post-processor that appends </s>) run by the `tokenizers` library, with truncation (keeping </s>) and
    padding (pad_token's id, 0 in T5) configured per call as T5TokenizerFast configures them. Special tokens
    of the configs that tokenizer.json lacks among its added tokens are added as transformers adds them
    (for T5 the `<extra_id_N>` sentinels that `extra_ids` asks for when additional_special_tokens has none).
    When tokenizer_config sets add_prefix_space (FLUX.1-dev's does) T5TokenizerFast rebuilds itself from
    spiece.model instead; its text handling is then taken here too (`as_converted_from_spiece`), so
    spiece.model and sentencepiece are not needed. A folder with spiece.model but no tokenizer.json is
    refused (transformers would convert it)."""

    def __init__(self, tokenizer: Tokenizer, settings: dict, model_max_length: int):
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length
        if settings.get("add_prefix_space") is not None:
            as_converted_from_spiece(tokenizer, settings)
        self.padding_side = settings.get("padding_side", "right")
        self.truncation_side = settings.get("truncation_side", "right")
        additional = list(settings.get("additional_special_tokens") or [])
        extra_ids = settings.get("extra_ids", 100)
        if not any("<extra_id_" in str(token_content(token)) for token in additional):
            additional += [f"<extra_id_{index}>" for index in range(extra_ids)]
        defaults = dict(eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
        _, specials = special_tokens(dict(settings, additional_special_tokens=additional), defaults)
        present = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
        declared = [spec for _, spec in sorted((int(index), spec) for index, spec in
                                               (settings.get("added_tokens_decoder") or {}).items())]
        missing = [AddedToken(spec["content"], single_word=spec.get("single_word", False),
                              lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                              normalized=spec.get("normalized", not spec.get("special", False)),
                              special=spec.get("special", False))
                   for spec in declared if spec["content"] not in present]
        present |= {token.content for token in missing}
        missing += [AddedToken(content, normalized=False, special=True) for content in specials
                    if content not in present]
        if missing:
            tokenizer.add_tokens(missing)
        self.pad_token = token_content(settings.get("pad_token", defaults["pad_token"]))
        self.pad_token_id = tokenizer.token_to_id(self.pad_token)
        self.eos_token_id = tokenizer.token_to_id(token_content(settings.get("eos_token", defaults["eos_token"])))

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], local_files_only: bool = True) -> "T5Tokenizer":
        """Read a diffusers FLUX `tokenizer_2/` folder: tokenizer.json, tokenizer_config.json (with
        model_max_length) and, if present, special_tokens_map.json (spiece.model is not needed)."""
        folder = Path(folder)
        settings, max_length = read_settings(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the T5 tokenizer is read from it (a folder with only "
                                    f"spiece.model needs converting by transformers); {RESTORE}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a plain Exception for a file it cannot parse
            raise TokenizerFileError(f"{path} cannot be read as a tokenizer ({error}): it is damaged or truncated; "
                                     f"{RESTORE}") from error
        return cls(tokenizer, settings, max_length)

    def encode_batch(self, texts: List[str], max_length: Optional[int]) -> List[List[int]]:
        # Padding is done by PromptTokenizer.pad (right or left, with pad_token_id), as the Rust padding would.
        self.tokenizer.no_padding()
        if max_length is None:
            self.tokenizer.no_truncation()
        else:
            self.tokenizer.enable_truncation(max_length, stride=0, strategy="longest_first",
                                             direction=self.truncation_side)
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
