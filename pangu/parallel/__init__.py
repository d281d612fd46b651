"""Devices, meshes and collective costs shared by every part of pangu."""

from pangu.parallel import collectives
from pangu.parallel import distributed
from pangu.parallel.mesh import MESH_AXES
from pangu.parallel.mesh import ParallelPlan
from pangu.parallel.mesh import cpu_mesh
from pangu.parallel.mesh import make_mesh
from pangu.parallel.mesh import require_no_pipeline
from pangu.parallel.mesh import single_device_mesh
from pangu.parallel.mesh import validate_plan
from pangu.parallel.topology import FABRICS
from pangu.parallel.topology import PRESETS
from pangu.parallel.topology import AxisSpec
from pangu.parallel.topology import DeviceSpec
from pangu.parallel.topology import LinkKind
from pangu.parallel.topology import Preset
from pangu.parallel.topology import Topology
from pangu.parallel.topology import atlas_300i_duo
from pangu.parallel.topology import atlas_800i_a2
from pangu.parallel.topology import atlas_800t_a2
from pangu.parallel.topology import cloudmatrix384
from pangu.parallel.topology import cpu
from pangu.parallel.topology import get_topology
from pangu.parallel.topology import pod
