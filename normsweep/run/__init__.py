"""One run: a Hydra job from config to outputs (``job``), its training loop (``train``), how its step is
compiled (``compiling``), seeds trained together as one stacked model (``packed``), the batched on-device
augmentation (``augment``), the model and budget a config asks for (``build``), resuming (``resume``), the
norm's recipe check (``recipes``), the trackers it reports to (``trackers``) and what it knows of a search
(``trial_hook``)."""
