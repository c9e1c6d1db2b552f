"""Plain-data records and the pure value types the decisions are made of."""
from .quota import Limits, Resources
from .records import Component, ImageBuild, ImageUpload, Node, NodeRequest
from .states import BuildState, NodeState, RequestState, UploadState

__all__ = ["Component", "ImageBuild", "ImageUpload", "Node", "NodeRequest", "Limits",
           "Resources", "BuildState", "NodeState", "RequestState", "UploadState"]
