"""Every error kvmem raises on bad input, each message saying what to change, and the warnings
kvmem gives about results that may mislead (`KvmemWarning`)."""


class KvmemError(Exception):
    """Base class: catch this to catch anything kvmem rejects."""


class UnknownModelError(KvmemError, ValueError):
    """A model name that is neither built in, a local folder, nor a TransformerLens name."""


class MissingDependencyError(KvmemError, ImportError):
    """An optional package (an extra) is needed for this call."""


class DependencyVersionError(KvmemError, RuntimeError):
    """An installed package version computes something wrongly (a known-answer check failed)."""


class CacheError(KvmemError):
    """A cached file is corrupt or stale (checksum or fingerprint mismatch)."""


class SubjectNotFoundError(KvmemError, ValueError):
    """The subject does not occur in the prompt (or occurs ambiguously)."""


class AmbiguousSubjectError(SubjectNotFoundError):
    """The subject occurs more than once and no occurrence was chosen."""


class EmptyTargetError(KvmemError, ValueError):
    """A target string is empty or tokenizes to nothing."""


class PromptTooLongError(KvmemError, ValueError):
    """A prompt (plus target) is longer than the model's context."""


class LayerOutOfRangeError(KvmemError, IndexError):
    """A layer (or neuron) index outside the model."""


class InvalidArgumentError(KvmemError, ValueError):
    """Any other argument kvmem cannot use as given."""


class DataFormatError(KvmemError, ValueError):
    """A data file that does not have the expected schema."""


class UnknownFactError(KvmemError, ValueError):
    """The model does not answer the fact (top-1), so there is no recall to localize."""


class RunLogError(KvmemError):
    """A run log (`kvmem.runs.RunLog`) that cannot be resumed with these settings, is not a run
    log, or cannot be written."""


class DuplicateRequestError(KvmemError, ValueError):
    """Two edit requests edit the same fact (same subject and relation, or same subject and prompt)."""


class AlreadySatisfiedError(InvalidArgumentError):
    """An edit request the model already answers with its target_new: there is nothing to edit."""


class ModelMismatchError(InvalidArgumentError):
    """Statistics or an edit made for other weights than the model's."""


class SingularStatisticsError(InvalidArgumentError):
    """C is singular or numerically not positive definite, so C⁻¹k cannot be trusted."""


class UnsafeEditError(KvmemError, ValueError):
    """`safe=True` / `--safe`: an edit whose predicted interference exceeds the threshold
    (`kvmem.predict_interference`)."""


class TargetCheckError(KvmemError, ValueError):
    """`--strict`: a target traced on its first token only, or a fact the model does not predict
    (a `KvmemWarning` turned into an error)."""


class KvmemWarning(UserWarning):
    """Base class of kvmem's warnings: results computed, but they may not mean what they seem.
    `warnings.simplefilter("error", KvmemWarning)` turns them into exceptions (the CLI's --strict)."""


class MultiTokenTargetWarning(KvmemWarning):
    """An analysis scores only the first token of a target of several tokens."""


class UnpredictedFactWarning(KvmemWarning):
    """The model does not predict the fact's target (`kvmem.config.predicts`)."""


class InterferenceWarning(KvmemWarning):
    """An edit predicted to disturb other facts (`kvmem.predict_interference(...).unsafe`)."""


class MissingDataError(DataFormatError, FileNotFoundError):
    """An evaluation data file (or the data folder, `$KVMEM_DATA`) that is not there
    (`kvmem.datafiles.data_path`). A `DataFormatError`, as a missing data file always was, and a
    `FileNotFoundError`."""


class DataChecksumError(MissingDataError):
    """A downloaded data file that is not the pinned one (wrong checksum, size or record count);
    it is not kept (`kvmem.downloads`)."""


class ExecutorError(KvmemError):
    """A batch run on an executor (`kvmem.executors`) that cannot go on: Ray missing or unreachable,
    a worker that cannot load the model, or an item whose worker died more often than allowed."""
