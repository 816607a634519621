"""The tiny config with Code Llama fill-in-the-middle on (seconds on CPU).

The tiny model (configs/lm/tiny.py) trained on the standard-library sources with
``data.fim_rate`` 0.9 and ``data.fim_spm_rate`` 0.5 (Code Llama, herd.lm.fim): its own
SentencePiece tokenizer is trained with the <PRE> <SUF> <MID> <EOT> sentinels (cached apart
from tiny.py's), and each training document is split into prefix / middle / suffix and
reordered PSM or SPM with probability 0.9, new decisions every epoch. As in Code Llama a
document whose FIM sequence would not fit in one row stays plain, so with rows of 256 tokens
only the short stdlib files are transformed: about one document in ten (5 of 57 in the
first 200 batches of seed 0; the iterator's counters fim_psm, fim_spm, fim_none say how
many; ``--config.data.max_doc_chars=200`` cuts the files into short documents first).
Eval batches stay plain next-token text. tools/eval_infill.py trains it on the files cut
into documents of at most 200 characters (herd.lm.data.split_code_document) in rows of
128, which FIM then reaches nearly always, and compares its infilling with the same model
trained without (tests/lm/test_fim_infill.py at CI size).

``model.max_seq_len`` 512 (twice the rows) leaves room to generate after a long infilling
prompt; the weights do not depend on it.

`python -m herd.lm.train --config=configs/lm/tiny_fim.py --config.train.steps=2`
"""

from configs.lm.tiny import get_config as tiny_config


def get_config(arg=None):
    c = tiny_config(arg)
    c.model.max_seq_len = 512
    c.data.seq_len = 256
    c.data.global_batch_size = 8
    c.data.fim_rate = 0.9
    c.data.fim_spm_rate = 0.5
    return c
