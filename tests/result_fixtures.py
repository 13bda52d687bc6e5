"""Result directories as a runner leaves them, for the experiments tests (no training)."""
from experiments import jobs, registry, store
from istr.config import EVAL_PROTOCOL

FINAL = ["mask_AP", "mask_AP50", "mask_AP75", "mask_APs", "mask_APm", "mask_APl",
         "box_AP", "box_AP50", "box_AP75", "box_APs", "box_APm", "box_APl"]


def put_result(root, name, label, scale, seed, metrics, run=None):
    """A complete result directory of one variant and seed: spec.json, metrics.json (and run.json if given)."""
    _, spec, digest = jobs.for_variant(registry.get(name), label, scale, (), seed)
    directory = store.result_dir(root, digest)
    store.write_json_atomic(directory / "spec.json", spec)
    stamped = {**metrics, "eval_protocol": EVAL_PROTOCOL} if "final" in metrics else metrics
    store.write_json_atomic(directory / "metrics.json", stamped)
    if run is not None:
        store.write_json_atomic(directory / "run.json", run)
    return directory


def box_rle(box, size):
    """The COCO RLE (counts as text, as in a json file) of a filled xywh ``box`` in an image of ``size`` (h, w)."""
    import numpy as np
    import pycocotools.mask as mask_util

    mask = np.zeros(size, np.uint8)
    x, y, w, h = box
    mask[y : y + h, x : x + w] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle
