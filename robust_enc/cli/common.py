"""What several subcommands share: the data, image-file and device options, the panel of sanity flags and the exit
codes."""

from __future__ import annotations

import argparse

# Exit codes of every command (README lists them): a CI job can tell a wrong command line from a model that failed
# its sanity checks.
EXIT_OK = 0
EXIT_USER_ERROR = 2  # bad input: one line on stderr
EXIT_FLAGS = 3  # a sanity check flagged the results (all written); --allow-flags accepts them
EXIT_SIGINT = 130  # Ctrl-C: finished results kept
EXIT_SIGTERM = 143  # SIGTERM: finished results kept, one line says where


def add_data_arguments(parser: argparse.ArgumentParser, *, default_dataset: str | None = "digits") -> None:
    """Options every data-reading subcommand shares."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default=default_dataset, help="data set registry name (see 'robust-enc datasets')")
    group.add_argument("--data-dir", default=None, help="folder holding the data set files")
    group.add_argument("--download", action="store_true", help="let torchvision download the data set (network)")
    group.add_argument("--subset", type=int, default=0, help="deterministic class-balanced subset size (0 = all)")
    group.add_argument("--batch-size", type=int, default=128)
    group.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")


def add_file_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Options for data sets read from image files (imagenet, folder:PATH): a list of images and the decode cache."""
    group = parser.add_argument_group("image files")
    group.add_argument("--subset-list", default=None, help="file naming the images to take, one per line, in its "
                       "order, e.g. RobustBench's 5,000 ImageNet images (instead of --subset)")
    group.add_argument("--cache", default=None, help="folder of the decoded evaluation images (resize, centre crop, "
                       "uint8, memory-mapped): built on first use, read by later runs")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """What to measure (a checkpoint, a registry model with weights, your own architecture, a TorchScript file) and
    the overrides of its preprocessing."""
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", default="", help="run folder, checkpoint file (exported.pt too) or TorchScript "
                       "file (exported.ts)")
    model.add_argument("--model", default="", help="registry name (see 'robust-enc models'), package.module:factory "
                       "(your own architecture: a callable returning an nn.Module on images in [0, 1], giving logits), "
                       "or torchscript; with --weights")
    model.add_argument("--weights", default="", help="state-dict file for --model, 'pretrained' (the library's own "
                       "weights: timm, torchvision; downloaded once), or a TorchScript file")
    prep = parser.add_argument_group("preprocessing (default: the model's own: timm's data config, torchvision's "
                                     "weights' transforms, else resize 256 bilinear, crop 224, the data's mean/std)")
    prep.add_argument("--mean", default=None, help="per-channel mean of the model's normalization, e.g. 0.5,0.5,0.5")
    prep.add_argument("--std", default=None, help="per-channel std of the model's normalization, e.g. 0.5,0.5,0.5")
    prep.add_argument("--interpolation", default=None, help="resize interpolation: bilinear, bicubic, ...")
    prep.add_argument("--crop-pct", type=float, default=None, help="centre crop / resized short side, e.g. 0.875")


def preprocessing_overrides(args: argparse.Namespace) -> dict:
    """The preprocessing flags as AttackConfig fields (checked there, once)."""
    from robust_enc.preprocessing import parse_overrides

    checked = parse_overrides(args.mean, args.std, args.interpolation, args.crop_pct)
    return dict(mean=checked.mean, std=checked.std, interpolation=checked.interpolation, crop_pct=checked.crop_pct)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")


def add_channels_last_argument(parser: argparse.ArgumentParser, while_: str) -> None:
    parser.add_argument("--channels-last", action="store_true",
                        help=f"convolution weights in NHWC while {while_}: faster kernels on GPUs and many CPUs, the "
                        "same values up to float rounding")


def add_allow_flags_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-flags", action="store_true",
                        help=f"exit 0 when sanity checks flag the results (default: exit {EXIT_FLAGS})")


def print_flags(lines: list[str], *, allow: bool = False) -> int:
    """One panel of every sanity flag (stderr), or one green line when none fired; returns the exit code: EXIT_FLAGS
    when a flag fired, unless ``allow``."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text

    console = Console(stderr=True)
    if not lines:
        console.print("[green]sanity checks: no flag[/green]")
        return EXIT_OK
    # Text, not markup: a flag line holds the run id, the user's text ("[/red]" is a name, not a tag)
    console.print(Panel(Text("\n".join(lines)), title=f"sanity checks: {len(lines)} flags (see the rows' flags "
                        "column)", border_style="red"))
    if allow:
        return EXIT_OK
    console.print(Text(f"exit {EXIT_FLAGS}: the results are written, but sanity checks flagged them; pass "
                       "--allow-flags to accept them"))
    return EXIT_FLAGS
