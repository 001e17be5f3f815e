"""The file names of kd's artifacts, in one place: what one stage writes and another reads.

    OUT/<fingerprint>/manifest.json, README.md    a teacher dataset (docs/FORMAT.md)
    <checkpoint>/kd_config.json                   beside every checkpoint kdtrain writes
    <checkpoint>/ir_projection.safetensors        kdtrain --online --ir-layers: the learned projection
    <eval dir>/results.json                       kdeval run and kdeval compare
"""

MANIFEST = "manifest.json"  # written last: present means the dataset is complete
CARD = "README.md"  # the dataset card with the HF YAML header
KD_CONFIG = "kd_config.json"  # the resolved training config and the datasets a checkpoint came from
IR_PROJECTION = "ir_projection.safetensors"  # training state, not part of the student model
RESULTS = "results.json"  # every figure of an evaluation
