"""Image data: ImageFolder domains, their splits, transforms, loaders and the built-in digits."""

from gmixout_cli.data.builtin import BUILTIN_ROOTS, materialise_digits, resolve_root
from gmixout_cli.data.dataset import ImageListDataset, ImageReadError, make_loader, read_image
from gmixout_cli.data.epochs import EpochBatches, make_train_loader
from gmixout_cli.data.folders import (
    IMAGE_EXTENSIONS,
    DomainData,
    Item,
    load_domain,
    load_eval_domain,
    scan_domain,
    sibling_domains,
)
from gmixout_cli.data.transforms import build_transform, to_rgb
from gmixout_cli.data.verify import image_problem, verify_domain_data, verify_images

__all__ = [
    "BUILTIN_ROOTS", "IMAGE_EXTENSIONS", "DomainData", "EpochBatches", "ImageListDataset", "ImageReadError", "Item",
    "build_transform", "load_domain", "load_eval_domain", "make_loader", "make_train_loader",
    "materialise_digits", "read_image",
    "resolve_root", "scan_domain", "sibling_domains", "to_rgb", "image_problem", "verify_domain_data", "verify_images",
]
