"""Model families; importing this package registers every model with timm."""
from .inresnet import *
from .hamiltonian import *
from .implicit import *
from .revnet import *
from .stable import *
from .odenet import *
