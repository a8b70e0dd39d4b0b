"""The names, defaults and limits that the app shows before a model is loaded.

Nothing here imports torch: the app builds and serves its page from these while torch and the
backbones load in the background (about 2 s of a cold start on 2 cores). The modules that use
them import them from here.
"""

BACKBONE_PAIRS: dict[str, tuple[str, str]] = {          # name -> (source, target) networks
    "effnet-lite": ("efficientnet_lite0", "efficientnet_lite1"),
    "resnet34-resnet50": ("resnet34", "resnet50"),
    "resnet18-resnet34": ("resnet18", "resnet34"),
}
DEFAULT_PAIR = "effnet-lite"
DEFAULT_IMAGE_SIZE = 320           # the detector's model resolution (pixels per side)
MAX_FIT_REFERENCES = 200           # good images one fit takes (the API's limit)

# An inspection session (the app's per-visitor state)
MAX_SESSION_REFERENCES = min(64, MAX_FIT_REFERENCES)   # good images per session (uploaded + marked good)
MAX_TEST_BATCH = 50                # test images per inspection
MAX_RESULTS = 50                   # unmarked results kept per session; the oldest go first
WORK_SIDE = 768                    # longer side of the images a session keeps
THUMB_SIDE = 224                   # longer side of gallery thumbnails
PARTS_TURN_ROTATION = 180.0        # "parts lie at any angle": augment with any rotation
SMALL_DEFECTS_SIZE = 384           # "small defects": a finer model resolution, slower
FALSE_ALARM_BUDGETS = (0.01, 0.02, 0.05, 0.1)   # the app's choices of a false-alarm budget
DEFAULT_FALSE_ALARM_BUDGET = 0.05  # DetectorConfig's default, for the page before torch loads
NO_DETECTOR = ("No detector yet: fit one on good images (step 1) or load a saved detector "
               "file first.")
