"""Public names of lsi: type checkers read them here; lsi/__init__.py imports each one on first use."""

__version__: str

from lsi.arch.registry import register_architecture as register_architecture
from lsi.arch.spec import ArchSpec as ArchSpec
from lsi.core.cache import ActivationCache as ActivationCache
from lsi.core.identity import ModelIdentity as ModelIdentity
from lsi.core.inputs import Batch as Batch
from lsi.core.interventions import Add as Add
from lsi.core.interventions import Apply as Apply
from lsi.core.interventions import Intervention as Intervention
from lsi.core.interventions import Mean as Mean
from lsi.core.interventions import Patch as Patch
from lsi.core.interventions import Scale as Scale
from lsi.core.interventions import Set as Set
from lsi.core.interventions import Zero as Zero
from lsi.core.loading import load as load
from lsi.core.model import GradResult as GradResult
from lsi.core.model import LanguageModel as LanguageModel
from lsi.core.positions import All as All
from lsi.core.positions import Index as Index
from lsi.core.positions import Last as Last
from lsi.core.positions import Match as Match
from lsi.core.positions import Span as Span
from lsi.core.selfcheck import self_check as self_check
from lsi.core.sites import Site as Site
from lsi.core.sites import from_transformer_lens as from_transformer_lens
from lsi.core.sites import to_transformer_lens as to_transformer_lens
from lsi.core.steering import Steering as Steering
from lsi.core.steering import compose as compose
from lsi.core.store import ActivationStore as ActivationStore
from lsi.core.store import cache_to_disk as cache_to_disk
from lsi.core.weight_edit import WeightEdit as WeightEdit
