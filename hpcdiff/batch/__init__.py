"""The sliced-job core every data command runs on: plan, slice, write and record, skip on rerun, finish once.

See docs/guarantees.md ("Sliced batch jobs") for what it promises.
"""

from hpcdiff.batch.job import Job, Outcome, finish_if_done, plan_once, run
from hpcdiff.batch.owner import STATE_DIR, Marker, read_marker, take
from hpcdiff.batch.plan import digest
from hpcdiff.batch.records import Record, all_records, read_record
from hpcdiff.batch.slices import Worker, array_task, task_of

__all__ = [
    "STATE_DIR",
    "Job",
    "Marker",
    "Outcome",
    "Record",
    "Worker",
    "all_records",
    "array_task",
    "digest",
    "finish_if_done",
    "plan_once",
    "read_marker",
    "read_record",
    "run",
    "take",
    "task_of",
]
