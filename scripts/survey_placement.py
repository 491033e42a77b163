"""Survey: for every image-classification model type, today's default and the traced placement."""
import sys, warnings, time
warnings.filterwarnings("ignore")
import torch
import transformers; transformers.logging.set_verbosity_error()
from alore_peft.tiny_models import tiny_model, image_classification_types, TinyModelUnavailable
from alore_peft.placement import find_placement, PlacementError
verbose = "-v" in sys.argv
types = [a for a in sys.argv[1:] if not a.startswith("-")] or image_classification_types()
for t in types:
    try:
        m = tiny_model(t)
    except TinyModelUnavailable as e:
        print(f"{t:22s} NOT BUILT  {e}"); continue
    t0 = time.time()
    try:
        p = find_placement(m)
    except PlacementError as e:
        print(f"{t:22s} NO TRACE   {str(e)[:200]}"); continue
    dt = time.time() - t0
    kinds = p.counts(); blocks = sum(s.placement == "block" for s in p.sites)
    print(f"{t:22s} sites={len(p.sites):3d} block={blocks:3d} {kinds} ({dt:.2f}s) targets={p.targets!r:.150}")
    if verbose:
        print(p.table())
