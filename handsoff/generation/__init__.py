"""Dataset generation: sample latents, predict labels and uncertainty, filter, write a standard dataset.

Sample ``i`` of a run is z = ``latents_for_seeds(seed, [i])`` mapped with the run's truncation, so any sample can
be regenerated alone. Work is cut into batches of global indices [b * batch, (b + 1) * batch); a batch is the
unit of parallelism and of resumption:

* each batch's files are written under their final names (each file atomically), then the batch's record
  ``.progress/batch-NNNNNNN.json`` (scores, keypoints, class presence) -- a batch without a record is redone;
* workers (torch.distributed ranks, e.g. under ``torchrun``) take batches b with b % world_size == rank;
* batch composition never depends on the number of workers, so outputs are byte-identical across worker counts,
  kills and resumes;
* when every batch is recorded, rank 0 finalizes: uncertainty filtering over the whole run, class quotas,
  ``manifest.jsonl``, COCO ``keypoints.json``, optional WebDataset shards, and ``dataset.json`` last.

Filtering: each task's image score (see ``handsoff.tasks``) is turned into a rank percentile over
the run; the filter score is one task's percentile or the mean over tasks ('combined'); exactly
floor(filter_top * n) samples with the highest scores are dropped (ties by index), recorded as filtered in the
manifest, and their files deleted or, with ``keep_filtered``, moved to ``filtered/``.

Class quotas (``min_class_fraction={"hat": 0.2}``): candidates are generated in index order; the dataset is the
first ceil(f * n) candidates whose predicted mask contains the class plus the first n - ceil(f * n) candidates
that do not. Candidates are generated in rounds until both quotas are full; the others are recorded as rejected.
"""

from handsoff.data.webdataset import read_webdataset, write_webdataset
from handsoff.generation.run import GenerationConfig, dataset_complete, generate_dataset, label_generator_source

__all__ = ["GenerationConfig", "dataset_complete", "generate_dataset", "label_generator_source", "read_webdataset",
           "write_webdataset"]
