"""What attacks and GBR measure (``ModelSource``): a robust-enc checkpoint (a run folder, ``checkpoint.pt`` or the
exported ``exported.pt``), a registry model with a state-dict file or the library's pretrained weights, your own
architecture (``--model package.module:factory --weights FILE``) or a TorchScript file (``exported.ts`` included).

Each source knows the preprocessing its model expects (``preprocessing``), names the weights that ran for the rows
(``weights_label``) and builds the model for a data set (``build``). Every refused combination is one line naming the
flag that takes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from robust_enc.checkpoint import (
    CHECKPOINT_NAME,
    FORMAT,
    Checkpoint,
    load_checkpoint,
    load_plain_weights,
    load_state_strict,
    model_from_checkpoint,
    read_safely,
    read_state_dict,
)
from robust_enc.errors import UserError
from robust_enc.images import DatasetInfo
from robust_enc.models import MODELS, ModelSpec, Normalize, NormalizedModel, library_preprocessing, library_weights
from robust_enc.preprocessing import Overrides, Preprocessing, suite_preprocessing
from robust_enc.user_models import TORCHSCRIPT, Factory, check_logits, is_torchscript, load_torchscript

PRETRAINED = "pretrained"
MODEL_FORMS = "a registry name (see 'robust-enc models'), package.module:factory, or torchscript"


@dataclass
class ModelSource:
    """One model to measure. ``model``: a registry name, ``package.module:factory`` or ``torchscript``; ``weights``:
    a file or ``pretrained``; ``checkpoint`` for robust-enc checkpoints."""

    checkpoint: Checkpoint | None = None
    model: str = ""
    weights: str = ""
    trained_on: str = ""  # the data set a TorchScript file's run folder was trained on ("" = unknown)

    @classmethod
    def open(cls, *, checkpoint: str = "", model: str = "", weights: str = "") -> ModelSource:
        """Take --checkpoint, or --model with --weights (a TorchScript file or a robust-enc checkpoint may also come
        as --weights alone); anything else is a UserError."""
        if checkpoint and (model or weights):
            raise UserError("give either --checkpoint or --model with --weights, not both: --checkpoint "
                            "RUN_OR_FILE, or --model NAME --weights PATH")
        if checkpoint:
            path = Path(checkpoint)
            if path.is_file() and is_torchscript(path):  # exported.ts, or any TorchScript file
                return cls(None, TORCHSCRIPT, str(path), _run_dataset(path.parent))
            return cls(load_checkpoint(checkpoint))
        if not (model or weights):
            raise UserError("say which model to measure: --checkpoint RUN_OR_FILE, or --model NAME --weights PATH")
        if weights and weights != PRETRAINED and Path(weights).is_file():
            if is_torchscript(weights):
                if model not in ("", TORCHSCRIPT):
                    raise UserError(f"{weights} is a TorchScript file (a whole model): pass --model torchscript "
                                    f"--weights {weights} (or --checkpoint {weights}), without --model {model}")
                return cls(None, TORCHSCRIPT, weights, _run_dataset(Path(weights).parent))
            if (ckpt := _robust_enc_checkpoint(weights, model)) is not None:
                return cls(ckpt)
        if not model:
            raise UserError(f"--weights {weights} needs --model: {MODEL_FORMS}")
        if not weights:
            raise UserError(f"--model {model} needs --weights: a state-dict file, or 'pretrained' for the library's "
                            "weights")
        return cls._for_model(model, weights)

    @classmethod
    def _for_model(cls, model: str, weights: str) -> ModelSource:
        if model == TORCHSCRIPT:
            raise UserError(f"--model torchscript takes a TorchScript file (torch.jit.save) as --weights; {weights} "
                            "is not one: for a state dict give --model NAME or package.module:factory")
        factory = Factory.parse(model)
        if factory is not None and model.partition(":")[0] not in MODELS.names():
            if weights == PRETRAINED:
                raise UserError(f"--model {model} is your own architecture: its weights come as --weights FILE (a "
                                "state dict); 'pretrained' names a library's weights for registry models only")
            return cls(None, model, weights)
        MODELS.lookup(model)  # unknown names: one line with a did-you-mean
        if weights == PRETRAINED:
            library_weights(model)  # a model without library weights fails now, before any data is read
        return cls(None, model, weights)

    @property
    def factory(self) -> Factory | None:
        return Factory.parse(self.model) if self.checkpoint is None and self.model not in MODELS else None

    @property
    def is_torchscript(self) -> bool:
        return self.checkpoint is None and self.model == TORCHSCRIPT

    def dataset(self, given: str | None) -> str:
        """The data set to measure on: ``given``, else the one the checkpoint (or its run folder) was trained on."""
        info = self.checkpoint.dataset_info if self.checkpoint is not None else None
        if given or info is not None or self.trained_on:
            return given or (info.name if info is not None else self.trained_on)
        if self.checkpoint is not None:
            raise UserError(f"checkpoint {self.checkpoint.path} records no data set: pass --dataset")
        raise UserError(f"--model {self.model} needs --dataset (the model is measured on that data set's images)")

    @property
    def image_size(self) -> int | None:
        """Square inputs of a checkpoint's model: image-folder data sets are resized to what it was trained on."""
        if self.checkpoint is None:
            return None
        _, height, width = self.checkpoint.spec.input_shape
        return int(height) if height == width else None

    @property
    def run_name(self) -> str:
        """The rows' ``run_id``: the checkpoint's run, the library's tag, a run folder's name for its exported.ts, else
        the weights file's stem."""
        if self.checkpoint is not None:
            return self.checkpoint.run_id
        if self.weights == PRETRAINED:
            return self.weights_label.partition(":")[2]
        path = Path(self.weights)
        return path.parent.name if self.is_torchscript and self.trained_on else path.stem

    @property
    def weights_label(self) -> str:
        """The rows' ``weights`` cell: the library's tag for pretrained weights, else the file's name."""
        if self.checkpoint is not None:
            # A run's training checkpoint is "checkpoint" (retrained in place: its older rows are replaced); any other
            # checkpoint file (RUN/exported.pt, a copy) is named, so its rows and the run's never replace each other.
            name = Path(self.checkpoint.path).name if self.checkpoint.path else CHECKPOINT_NAME
            return "checkpoint" if name == CHECKPOINT_NAME else name
        if self.weights == PRETRAINED:
            return library_weights(self.model).tag
        return Path(self.weights).name

    def preprocessing(self, overrides: Overrides = Overrides()) -> Preprocessing:
        """The evaluation preprocessing this model expects, with ``overrides`` applied. mean/std left empty mean "the
        data set's" (``completed`` fills them in once the data set is known)."""
        if self.checkpoint is not None:  # the suite's pipeline, which it was trained with
            spec = self.checkpoint.spec
            base = suite_preprocessing(self.image_size or 224, spec.mean, spec.std)
        elif self.factory is not None or self.is_torchscript:
            base = replace(suite_preprocessing(), normalize_inside=not (overrides.mean or overrides.std))
        else:
            base = (library_preprocessing(self.model, pretrained=self.weights == PRETRAINED)
                    or replace(suite_preprocessing(), mean=(), std=()))
        return overrides.apply(base)

    def build(self, info: DatasetInfo, preprocessing: Preprocessing | None = None) -> nn.Module:
        """The model in eval mode for data set ``info``, its normalization set to ``preprocessing``'s mean/std when
        given (a module:factory or TorchScript model gets a ``Normalize`` in front only for --mean/--std)."""
        channels = info.input_shape[0]
        if preprocessing is not None and preprocessing.mean and not (
                len(preprocessing.mean) == len(preprocessing.std) == channels):
            raise UserError(f"--mean/--std give {len(preprocessing.mean)}/{len(preprocessing.std)} values, {info.name} "
                            f"has {channels} channel(s): give one value per channel to each")
        if self.checkpoint is not None:
            model: nn.Module = self._checkpoint_model(info)
        elif self.factory is not None or self.is_torchscript:
            model = self._foreign_model(info)
        else:
            spec = ModelSpec(self.model, info.num_classes, info.input_shape, info.mean, info.std)
            model = load_plain_weights(spec, self.weights)
        if preprocessing is None or preprocessing.normalize_inside or not preprocessing.mean:
            return model
        if self.checkpoint is not None and (tuple(preprocessing.mean), tuple(preprocessing.std)) == (
                tuple(self.checkpoint.spec.mean), tuple(self.checkpoint.spec.std)):
            return model  # no --mean/--std: the checkpoint's own normalization, as stored (never silently repaired)
        if isinstance(model, NormalizedModel):
            normalize = Normalize(preprocessing.mean, preprocessing.std)
            if not (normalize.mean.equal(model.normalize.mean) and normalize.std.equal(model.normalize.std)):
                model.normalize = normalize  # --mean/--std, or a library's own (a timm model on in-memory images)
            return model
        return NormalizedModel(Normalize(preprocessing.mean, preprocessing.std), model).eval()

    def _checkpoint_model(self, info: DatasetInfo) -> nn.Module:
        spec = self.checkpoint.spec  # type: ignore[union-attr]
        if (spec.num_classes, tuple(spec.input_shape)) != (info.num_classes, tuple(info.input_shape)):
            raise UserError(f"the model was built for {spec.num_classes} classes of {tuple(spec.input_shape)} images, "
                            f"but {info.name} ({info.split}) has {info.num_classes} classes of "
                            f"{tuple(info.input_shape)}: pass the data set the model was trained on (--dataset)")
        return model_from_checkpoint(self.checkpoint)  # type: ignore[arg-type]

    def _foreign_model(self, info: DatasetInfo) -> nn.Module:
        if self.is_torchscript:
            model, source = load_torchscript(self.weights), f"TorchScript file {self.weights}"
        else:
            factory = self.factory
            model, source = factory.build(), f"--model {factory}"  # type: ignore[union-attr]
            load_state_strict(model, read_state_dict(self.weights), self.weights)
        check_logits(model, info.input_shape, info.num_classes, source)
        return model.eval()


def completed(preprocessing: Preprocessing, info: DatasetInfo, overrides: Overrides = Overrides()) -> Preprocessing:
    """``preprocessing`` with the data set's mean/std where it left them to the data set, or where a library's RGB
    mean/std meet images of another channel count (a wrong --mean/--std stays: ``build`` refuses it)."""
    channels = info.input_shape[0]
    mean, std = preprocessing.mean or info.mean, preprocessing.std or info.std
    if len(mean) != channels and not overrides.mean:
        mean = info.mean
    if len(std) != channels and not overrides.std:
        std = info.std
    return replace(preprocessing, mean=mean, std=std)


def preprocessing_text(preprocessing: Preprocessing, info: DatasetInfo) -> str:
    """The rows' ``preprocessing`` cell: the decode (for image files) and the normalization."""
    return preprocessing.text(decoded=bool(info.preprocessing))


def _robust_enc_checkpoint(weights: str, model: str) -> Checkpoint | None:
    """``weights`` as a robust-enc checkpoint (``exported.pt`` included) when it is one and fits ``--model``; None for
    any other file (a plain state dict)."""
    try:
        payload = read_safely(Path(weights), "weights")
    except UserError:
        return None  # read_state_dict gives the line for it
    if not (isinstance(payload, dict) and payload.get("format") == FORMAT):
        return None
    ckpt = load_checkpoint(weights)
    if model and model != ckpt.spec.name:
        raise UserError(f"{weights} is a robust-enc checkpoint of {ckpt.spec.name}, not {model}: pass --checkpoint "
                        f"{weights} (without --model)")
    return ckpt


def _run_dataset(folder: Path) -> str:
    """The data set of the run folder a file sits in (its config.json), "" when it is not in one."""
    config = folder / "config.json"
    if not (folder / CHECKPOINT_NAME).is_file() or not config.is_file():
        return ""
    try:
        return str(json.loads(config.read_text()).get("dataset", ""))
    except (OSError, ValueError, AttributeError):
        return ""
