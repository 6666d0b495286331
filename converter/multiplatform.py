"""`nydusify convert --platform a,b` / `--all-platforms`: one converted image per platform,
joined under the target tag by an OCI index (each entry's `platform` from the converted
image's config).

Each platform is converted by convert() into a private OCI layout next to the target (same
filesystem, so blobs move instead of being copied); then, all-or-nothing, a layout target gets
every blob and the index (converter/target.py's Staging), a registry target every image by
digest and the index last under the tag. A failed platform leaves the target as it was.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from converter.convert import ConvertResult, convert
from converter.sources import RegistryOptions, SourceRef, parse_platform
from nydus_py.errors import ConfigError, ImageFormatError
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.layout import Descriptor, OCILayout, canonical_json, json_object
from nydus_py.oci.reference import parse as parse_reference


@dataclass
class PlatformsResult:
    index: Descriptor
    images: dict[str, ConvertResult]          # platform → its conversion
    pushed_digest: str | None = None


def source_platforms(source: SourceRef, registry: RegistryOptions | None) -> list[str]:
    """`os/arch[/variant]` of every image in the source's index (attestations left out)."""
    if source.transport == "oci":
        layout = OCILayout(Path(source.path))
        desc = layout.resolve(source.reference)
        index = layout.read_json(desc, f"{source}: index") if desc.media_type in mt.INDEX_TYPES else None
    elif source.transport == "docker":
        r = parse_reference(source.path)
        with (registry or RegistryOptions()).client(r) as client:
            data, media_type, _ = client.get_manifest(r.repository, r.digest or r.tag or "latest")
        index = json_object(data, f"{source}: index") if media_type in mt.INDEX_TYPES else None
    else:
        raise ConfigError(f"--all-platforms: {source} is not a multi-platform image")
    if index is None:
        raise ConfigError(f"--all-platforms: {source} is a single image, not an index")
    out = []
    for e in index.get("manifests") or []:
        p = (e or {}).get("platform") if isinstance(e, dict) else None
        if not isinstance(p, dict) or p.get("os") in (None, "unknown"):
            continue
        name = f"{p.get('os')}/{p.get('architecture')}" + (f"/{p['variant']}" if p.get("variant") else "")
        if name not in out:
            out.append(name)
    if not out:
        raise ImageFormatError(f"{source}: index names no platforms")
    return out


def convert_platforms(source: SourceRef, target: SourceRef, options, platforms: list[str], *,
                      registry: RegistryOptions | None = None,
                      target_registry: RegistryOptions | None = None, **kw) -> PlatformsResult:
    """Each of `platforms` converted, then the index; `kw` goes to convert() for each."""
    if target.transport not in ("oci", "docker"):
        raise ConfigError(f"target {target}: use oci:DIR[:TAG] or a registry reference HOST/REPO:TAG")
    if kw.get("merge_platform"):
        raise ConfigError("--merge-platform with several platforms is not supported")
    for p in platforms:
        parse_platform(p)
    target_registry = target_registry or registry or RegistryOptions()
    base = Path(target.path).parent if target.transport == "oci" else Path(target_registry.work_dir or
                                                                            tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".nydusify-platforms-", dir=base))
    try:
        images: dict[str, ConvertResult] = {}
        entries = []
        for i, p in enumerate(platforms):
            res = convert(source, SourceRef("oci", str(tmp / f"p{i}"), "image"), options, platform=p,
                          registry=registry, **kw)
            images[p] = res
            layout = OCILayout(tmp / f"p{i}")
            config = layout.read_json(Descriptor.from_json(
                layout.read_json(res.manifest, "converted manifest")["config"], "config"), "config")
            platform = {"architecture": config.get("architecture"), "os": config.get("os")}
            if config.get("variant"):
                platform["variant"] = config["variant"]
            entries.append({"mediaType": res.manifest.media_type, "digest": res.manifest.digest,
                            "size": res.manifest.size, "platform": platform})
        index = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": entries})
        if target.transport == "oci":
            from converter.target import Staging
            with Staging(Path(target.path)) as staging:
                assert staging.layout is not None
                for i in range(len(platforms)):
                    _move_blobs(tmp / f"p{i}", staging.layout)
                desc = staging.layout.put_bytes(index, mt.OCI_INDEX)
                staging.commit(desc, target.reference)
            return PlatformsResult(desc, images)
        from converter.push import push_converted
        ref = parse_reference(target.path)
        with target_registry.client(ref) as client:
            for i, res in enumerate(images.values()):
                push_converted(tmp / f"p{i}", res.manifest,
                               dataclasses.replace(ref, tag=None, digest=res.manifest.digest), client,
                               concurrency=target_registry.concurrency)
            pushed = client.put_manifest(ref.repository, ref.tag or ref.digest or "latest", index,
                                         mt.OCI_INDEX)
        from nydus_py.oci import digest as dg
        return PlatformsResult(Descriptor(mt.OCI_INDEX, dg.of_bytes(index), len(index)), images, pushed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_blobs(src: Path, dest) -> None:
    blobs = src / "blobs"
    for algo in sorted(os.listdir(blobs)):
        for name in sorted(os.listdir(blobs / algo)):
            p = blobs / algo / name
            dest.adopt_file(p, f"{algo}:{name}", p.stat().st_size, "")
