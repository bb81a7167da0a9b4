"""Image formats: the on-disk logic of format drivers, kept apart from the node layer.

Each format package knows its file layout and works on an abstract storage (async
pread/pwrite/flush of its protocol child); it has no asyncio of its own and no QMP.
The block drivers in :mod:`qmpjobd.block.drivers` wrap them into graph nodes.
"""
