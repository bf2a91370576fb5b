"""Tooltips of the widgets' fields, in one place (the config key each field sets)."""

from __future__ import annotations

TOOLTIPS: dict[str, str] = {
    # shared
    "device": "where the network runs (free GPU memory is read when the list opens, and "
              "every 2 s while a run goes)",
    "output": "run folder: config.yaml, checkpoints/, log.jsonl, figures",
    "resume": "continue a run folder (or a checkpoint inside it) with its own config",
    "resumed": "taken from the run being resumed",
    "start": "start; while it runs: stop at the next step (a checkpoint is written)",
    "follow_run": "show a run folder as it is written, whoever runs it (a terminal, torchrun, "
                  "a cluster job on a shared folder): loss, progress, validation and each "
                  "new checkpoint; Stop ends following, not the run",
    # pretraining
    "pretrain_layers": "3-D image layers to pretrain on (written to RUN_DIR/layers/)",
    "pretrain_steps": "optimizer steps in total (optim.total_steps)",
    "batch": "volumes per micro-batch (optim.batch_size); auto (0, the default): the "
             "preset's volumes per step, split into micro-batches and gradient "
             "checkpointing chosen from the device's free memory (the status line says "
             "what was chosen; on a CPU, the preset's own split)",
    "pretrain_lr": "peak learning rate (optim.lr), after warm-up",
    "teacher": "EMA teacher (model.teacher): full (backbone + head), head only, or none",
    "variant": "loss (loss.variant): v1, the VoCo paper's position loss; v2, intra- and "
               "inter-volume consistency (needs an EMA teacher: head or full)",
    "processes": "training processes, one per GPU: more than 1 starts the run as "
                 "'torchrun --nproc_per_node N' (DDP), followed like any run folder",
    "checkpoint_every": "steps between checkpoints (run.checkpoint_every): fresh weights for "
                        "live inspection; one is also written at the end and on Stop",
    # finetuning
    "pairs": "training cases; when empty, the pair chosen above is used",
    "add_pair": "add the chosen image and labels layers to the list",
    "pretrained": "VoCo pretraining run, checkpoint or released weights for the encoder",
    "finetune_steps": "optimizer steps in total (train.total_steps)",
    "finetune_lr": "peak learning rate (train.lr)",
    "val_every": "steps between validations (train.val_every); one is also run at the end",
    "sparse_axis": "the axis whose slices you paint; default: the axis napari is slicing "
                   "(the slider's axis in 2-D view, else axis 0), read when the run starts",
    "sparse_reviewed": "annotated slices only (data.ignore_label): along the axis, the slices "
                       "you painted on or accepted are fully annotated (their unpainted voxels "
                       "are background); every other slice, a copied prediction included, is "
                       "ignored. From 3 annotated slices on, every 4th (at least one) is held "
                       "out for the validation Dice",
    "copy_prediction_review": "copy the segmentation into the training labels layer of the pair "
                              "whose image was segmented (whole volume: your annotated slices "
                              "are kept; or the slice shown). Copied slices are not training "
                              "labels until you review them: paint a correction or Accept slice "
                              "(Ctrl+Z on that layer undoes the copy)",
    "accept_slice": "mark the slice shown (along the sparse axis) of the training labels layer "
                    "as reviewed: it trains as it is, its unpainted voxels background; click "
                    "again to take the mark back",
    "review_next": "slices to annotate next: predicted-foreground slices in a random order "
                   "(it beat the most uncertain and evenly spaced slices in "
                   "benchmarks/review_bench.py); each row names the slice's most uncertain "
                   "predicted class and its entropy; annotated slices left out; click one "
                   "to go there",
    "continue": "start a new run (RUN_r2, RUN_r3, ...) from the last run's best checkpoint "
                "(else last.pt) with the current labels and the steps above; its meta.json "
                "records the parent",
    "export_bundle": "write the finetuned run (this widget's last run, else 'Resume from') as a "
                     "MONAI Bundle that runs with MONAI alone: into the chosen folder when it is "
                     "empty, else into a new RUN_bundle folder inside it",
    # inference
    "overlap": "sliding-window overlap (more: smoother, slower)",
    "follow": "follow a VoCo pretrain widget of this viewer: use each checkpoint it writes "
              "and re-predict (lower its 'Checkpoint every' for fresh weights)",
    "grid": "load the model, pre-process the image and draw the base-crop grid",
    "place": "put one training-sized sub-volume in the centre of the 'VoCo sub-volume' "
             "layer; drag or resize it and the prediction follows",
    "predict": "predict for the selected (or last) shape in 'VoCo sub-volume'",
    "sample": "draw N random sub-volumes as in training and colour them by the error of "
              "their predicted overlap",
    "show_sample": "show this sampled sub-volume's overlap in the heat maps",
    "crop": "the crop exactly as the network sees it (resampled to the input size, "
            "intensities normalised), in place",
}
