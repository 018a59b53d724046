"""The networks behind FID and CLIP score, in MindSpore, loaded strictly from user-given weights.

- `InceptionFeatureExtractor`: mindcv's ImageNet `inception_v3`, 2048-d globally pooled features (FID).
  FID computed with it is comparable between cache settings scored with the same weights file. It is
  NOT comparable with published FID numbers: those (pytorch-fid, clean-fid) use the TensorFlow
  "FID Inception" weights and their own resizing, which give different features.
- `CLIPScorer`: a CLIP model in the transformers folder format (config.json, model.safetensors,
  tokenizer, preprocessor_config.json), run with mindone's `CLIPModel` and transformers' `CLIPProcessor`.

Both run in GRAPH and PYNATIVE mode on CPU, GPU and Ascend: mindone's CLIP patch embedding
(`mint.nn.Conv2d`, no CPU kernel) is replaced by an equivalent portable cell after loading. Weights are
checked name by name and shape by shape against the files, because the underlying loaders only warn
about missing or unexpected weights and would run with random ones.
"""

from pathlib import Path
from typing import Callable, Iterator, List, Sequence, Union

import numpy as np
from PIL import Image

import mindspore as ms
from mindspore import nn, ops
from mindspore.nn.utils import no_init_parameters
from mindcv.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from mindcv.models import inception_v3
from mindone.transformers import CLIPModel
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPProcessor

from eval.image_metrics import clip_score
from models.demo_checkpoint import TRANSFORMERS_WEIGHTS_NAME, checkpoint_shapes
from models.loading import CheckpointError, listed_names, check_weights_match, stored_tensors, without_ignored

PathLike = Union[str, Path]
INCEPTION_SIZE = 299
# mindcv's ImageNet transforms normalize pixel values in the 0-255 scale with these (inception_v3's
# default_cfg sets no mean/std of its own, so its published weights were trained with them).
INCEPTION_MEAN = np.array(IMAGENET_DEFAULT_MEAN, np.float32)
INCEPTION_STD = np.array(IMAGENET_DEFAULT_STD, np.float32)
DEFAULT_BATCH_SIZE = 16


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def run_padded(cell: nn.Cell, arrays: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Run `cell` on a batch of fewer than `size` rows padded to `size` (repeating the last row), and
    return the real rows: every call has the same shapes, so graph mode compiles once."""
    rows = len(arrays[0])
    padded = [np.concatenate([array, np.repeat(array[-1:], size - rows, axis=0)]) for array in arrays]
    return cell(*(ms.Tensor(array) for array in padded)).asnumpy()[:rows]


def embed_in_batches(cell: nn.Cell, inputs: Sequence, prepare: Callable[[Sequence], List[np.ndarray]],
                     batch_size: int) -> np.ndarray:
    """`cell` over `inputs` in fixed-size batches; `prepare(batch)` turns a slice of inputs into the
    cell's numpy arguments, so only one batch is ever held in preprocessed form."""
    if not len(inputs):
        raise ValueError("nothing to embed: the input list is empty")
    size = min(batch_size, len(inputs))
    return np.concatenate([run_padded(cell, prepare(batch), size) for batch in batches(inputs, size)])


# ----- Inception (FID) -----

class InceptionPoolFeatures(nn.Cell):
    """mindcv's inception_v3 up to its global average pool: the 2048-d features before the classifier."""

    def __init__(self, network: nn.Cell):
        super().__init__()
        self.network = network

    def construct(self, pixels: ms.Tensor) -> ms.Tensor:
        return self.network.pool(self.network.forward_features(pixels))


def load_inception_v3(path: PathLike) -> nn.Cell:
    """mindcv's inception_v3 (1000 classes, auxiliary head) with every parameter from the .ckpt at `path`.

    Strict both ways: a parameter the network has and the file lacks, a file entry the network does not
    use (optimizer state of a training checkpoint, another architecture) or a shape mismatch is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {path} do not exist: give mindcv's inception_v3 ImageNet "
                                "checkpoint (a MindSpore .ckpt file)")
    try:
        stored = ms.load_checkpoint(str(path))
    except ValueError as error:
        raise CheckpointError(f"{path} is not a MindSpore checkpoint (.ckpt) readable by mindspore.load_checkpoint: "
                              f"{error}") from error
    network = inception_v3(pretrained=False)
    expected = {name: tuple(param.shape) for name, param in network.parameters_and_names()}
    missing = [name for name in expected if name not in stored]
    unexpected = [name for name in stored if name not in expected]
    problems = []
    if missing:
        problems.append(f"it lacks {len(missing)} parameter(s): {listed_names(missing)}")
    if unexpected:
        problems.append(f"it holds {len(unexpected)} entries the network does not have: {listed_names(unexpected)} "
                        "(export the network parameters only, without optimizer state)")
    problems += [f"{name} has shape {list(stored[name].shape)}, the network expects {list(shape)}"
                 for name, shape in expected.items() if name in stored and tuple(stored[name].shape) != shape]
    if problems:
        raise CheckpointError(f"{path} does not hold mindcv's inception_v3 (1000 classes, aux head): "
                              + "; ".join(problems))
    ms.load_param_into_net(network, stored, strict_load=True)  # names and shapes were checked above
    network.set_train(False)
    return network


def inception_pixels(image: Image.Image) -> np.ndarray:
    """One image as inception_v3 input: RGB, the whole image resized to 299x299 (PIL bilinear, no crop,
    as FID implementations do), normalized as mindcv's ImageNet transforms do; (3, 299, 299) float32."""
    resized = image.convert("RGB").resize((INCEPTION_SIZE, INCEPTION_SIZE), Image.BILINEAR)
    pixels = (np.asarray(resized, np.float32) - INCEPTION_MEAN) / INCEPTION_STD
    return pixels.transpose(2, 0, 1)


class InceptionFeatureExtractor:
    """2048-d Inception features of images, for FID (see the module docstring on comparability)."""

    def __init__(self, weights: PathLike, batch_size: int = DEFAULT_BATCH_SIZE):
        self.model = InceptionPoolFeatures(load_inception_v3(weights))
        self.model.set_train(False)
        self.batch_size = batch_size

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(len(images), 2048) float32 features."""
        return embed_in_batches(self.model, images, lambda batch: [np.stack([inception_pixels(im) for im in batch])],
                                self.batch_size)


# ----- CLIP score -----

class PatchEmbedding(nn.Cell):
    """CLIP's patch embedding (a bias-free convolution with stride = kernel = patch size) as reshape +
    matmul, which every backend runs; mindone's `mint.nn.Conv2d` has no CPU kernel. Holds the loaded
    convolution's weight Parameter itself, so it keeps the checkpoint's values and name."""

    def __init__(self, conv: nn.Cell):
        super().__init__()
        out_channels, in_channels, patch, patch_w = conv.weight.shape
        layout = (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups, conv.bias)
        if patch != patch_w or layout != ((patch, patch), (0, 0), (1, 1), 1, None):
            raise ValueError(f"not a CLIP patch embedding (kernel {patch}x{patch_w}, stride/padding/dilation/groups/"
                             f"bias {layout}): expected stride = kernel, no padding, no bias")
        self.weight = conv.weight
        self.patch = patch
        self.kernel_features = in_channels * patch * patch
        self.out_channels = out_channels

    def construct(self, pixels: ms.Tensor) -> ms.Tensor:
        batch, channels, height, width = pixels.shape
        rows, cols = height // self.patch, width // self.patch
        patches = pixels.reshape(batch, channels, rows, self.patch, cols, self.patch).transpose(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch, rows * cols, self.kernel_features)
        kernel = self.weight.reshape(self.out_channels, self.kernel_features)
        embedded = ops.matmul(patches, kernel.swapaxes(0, 1))
        return embedded.swapaxes(1, 2).reshape(batch, self.out_channels, rows, cols)


class CLIPImageEmbedder(nn.Cell):
    """Projected image embeddings (CLIPModel.get_image_features) as one compiled cell."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.vision_model = model.vision_model
        self.visual_projection = model.visual_projection

    def construct(self, pixel_values: ms.Tensor) -> ms.Tensor:
        return self.visual_projection(self.vision_model(pixel_values)[1])


class CLIPTextEmbedder(nn.Cell):
    """Projected text embeddings (CLIPModel.get_text_features) as one compiled cell."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.text_model = model.text_model
        self.text_projection = model.text_projection

    def construct(self, input_ids: ms.Tensor, attention_mask: ms.Tensor) -> ms.Tensor:
        return self.text_projection(self.text_model(input_ids, attention_mask)[1])


def clip_folder(path: PathLike) -> Path:
    """The CLIP folder, after checking that it holds every file the scorer reads."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"CLIP model folder {folder} does not exist (expected a transformers CLIPModel "
                                "folder, e.g. a download of openai/clip-vit-large-patch14)")
    required = ["config.json", TRANSFORMERS_WEIGHTS_NAME, "preprocessor_config.json"]
    missing = [name for name in required if not (folder / name).is_file()]
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        missing.append("tokenizer.json or vocab.json + merges.txt")
    if missing:
        sharded = (folder / f"{TRANSFORMERS_WEIGHTS_NAME}.index.json").is_file()
        raise FileNotFoundError(f"CLIP model folder {folder} lacks {', '.join(missing)}"
                                + (" (sharded weights are not supported)" if sharded else ""))
    return folder


def load_clip_model(folder: Path) -> CLIPModel:
    """mindone's CLIPModel from `folder` in fp32 with the portable patch embedding installed. Names and
    shapes of model.safetensors are checked against the model built from config.json first."""
    config = CLIPConfig.from_pretrained(folder, local_files_only=True)
    with no_init_parameters():
        expected = checkpoint_shapes(CLIPModel(config))
    stored = without_ignored(stored_tensors([folder / TRANSFORMERS_WEIGHTS_NAME]),
                             tuple(CLIPModel._keys_to_ignore_on_load_unexpected))
    check_weights_match(expected, stored, folder)
    model = CLIPModel.from_pretrained(str(folder), config=config, dtype=ms.float32, local_files_only=True)
    embeddings = model.vision_model.embeddings
    embeddings.patch_embedding = PatchEmbedding(embeddings.patch_embedding)
    model.set_train(False)
    return model


class CLIPScorer:
    """CLIP score of (image, prompt) pairs: 100 * max(cos(image embedding, text embedding), 0)."""

    def __init__(self, model_dir: PathLike, batch_size: int = DEFAULT_BATCH_SIZE):
        folder = clip_folder(model_dir)
        # The slow (PIL) image processor: the fast one needs torch, which the runtime does not install.
        self.processor = CLIPProcessor(image_processor=CLIPImageProcessor.from_pretrained(folder),
                                       tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))
        model = load_clip_model(folder)
        self.max_length = model.config.text_config.max_position_embeddings
        self.image_embedder = CLIPImageEmbedder(model)
        self.text_embedder = CLIPTextEmbedder(model)
        self.batch_size = batch_size

    def image_embeds(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Projected (not normalized) image embeddings, (len(images), projection_dim)."""
        def prepare(batch: Sequence[Image.Image]) -> List[np.ndarray]:
            return [self.processor(images=[image.convert("RGB") for image in batch], return_tensors="np")
                    ["pixel_values"]]
        return embed_in_batches(self.image_embedder, images, prepare, self.batch_size)

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        """Projected (not normalized) text embeddings; prompts are truncated to CLIP's context length."""
        def prepare(batch: Sequence[str]) -> List[np.ndarray]:
            tokens = self.processor(text=list(batch), return_tensors="np", padding="max_length",
                                    max_length=self.max_length, truncation=True)
            return [tokens["input_ids"], tokens["attention_mask"]]
        return embed_in_batches(self.text_embedder, prompts, prepare, self.batch_size)

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """CLIP score of each image with its prompt, (len(images),) in [0, 100]."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts: give one prompt per image")
        return clip_score(self.image_embeds(images), self.text_embeds(prompts))
