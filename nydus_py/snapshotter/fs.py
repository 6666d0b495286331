"""The real RemoteFileSystem: the Resolver decides which layers are ours, the DaemonManager
serves each image with nydusd."""

from __future__ import annotations

from pathlib import Path

from nydus_py.snapshotter.core import Snapshotter, prepare_root
from nydus_py.snapshotter.daemons import DaemonManager
from nydus_py.snapshotter.remote import RemoteConfig, RemoteLayer
from nydus_py.snapshotter.resolver import Resolver
from nydus_py.snapshotter.store import Store


class NydusFileSystem:
    def __init__(self, config: RemoteConfig, store: Store):
        self.config = config
        self.resolver = Resolver(config)
        self.daemons = DaemonManager(config, store, self.resolver)

    def classify(self, labels: dict[str, str]) -> RemoteLayer | None:
        return self.resolver.classify(labels)

    def mount(self, layer: RemoteLayer) -> Path:
        return self.daemons.ensure(layer)

    def mountpoint(self, image_id: str) -> Path:
        return self.daemons.mountpoint(image_id)

    def unmount(self, image_id: str) -> None:
        self.daemons.release(image_id)

    def start(self) -> None:
        self.daemons.reattach_all()
        self.daemons.start_shared()
        self.daemons.start_monitor(self.config.recover_interval)

    def cleanup(self) -> None:
        self.daemons.cleanup()

    def close(self) -> None:
        self.daemons.close()
        self.resolver.close()


def open_snapshotter(root: str | Path, remote: RemoteConfig | None = None, *,
                     enable_remote: bool = True) -> Snapshotter:
    """The snapshotter of `nydus-snapshotter`: nydusd behind remote snapshots unless
    `enable_remote` is False (a plain overlayfs snapshotter)."""
    root = prepare_root(root)
    store = Store(root / "metadata.db")
    fs = NydusFileSystem(remote or RemoteConfig(root=root), store) if enable_remote else None
    return Snapshotter(root, fs=fs, store=store)
