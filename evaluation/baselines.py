"""Published DataComp baselines (DataComp paper, Table 3; the released OpenCLIP checkpoints)."""

MEDIUM = {
    # name: (kept samples, ImageNet, ImageNet dist. shifts, VTAB, Retrieval, Average over 38, OpenCLIP tag)
    "no filtering": (128_000_000, 0.176, 0.152, 0.259, 0.219, 0.258, "commonpool_m_s128m_b4k"),
    "basic": (30_000_000, 0.226, 0.193, 0.284, 0.251, 0.285, "commonpool_m_basic_s128m_b4k"),
    "text-based": (31_000_000, 0.255, 0.215, 0.328, 0.249, 0.307, "commonpool_m_text_s128m_b4k"),
    "image-based": (29_000_000, 0.268, 0.213, 0.319, 0.256, 0.312, "commonpool_m_image_s128m_b4k"),
    "LAION-2B filter": (13_000_000, 0.230, 0.198, 0.307, 0.233, 0.292, "commonpool_m_laion_s128m_b4k"),
    "CLIP score L/14 top 30%": (38_000_000, 0.273, 0.230, 0.338, 0.251, 0.328, "commonpool_m_clip_s128m_b4k"),
    "image-based and CLIP score": (14_000_000, 0.297, 0.239, 0.346, 0.231, 0.328, "datacomp_m_s128m_b4k"),
}
COLUMNS = ("ImageNet", "ImageNet dist. shifts", "VTAB", "Retrieval", "Average")
BASELINES = {"medium": MEDIUM}


def rows(scale: str) -> list[dict]:
    if scale not in BASELINES:
        from conceptprune.errors import ConfigError

        raise ConfigError(f"no published baselines for scale {scale!r} (have: {', '.join(BASELINES)})")
    return [{"run": f"baseline: {name}", "kept": kept, **dict(zip(COLUMNS, vals)), "tag": tag}
            for name, (kept, *vals, tag) in BASELINES[scale].items()]
