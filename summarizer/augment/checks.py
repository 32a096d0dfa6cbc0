"""`check_config`: fail before any work (no model loaded, no request sent) on values that cannot
work, naming the key. Method options are checked by their names (`fraction`, `copies`, per-language
`prompt` / `templates` / `to_pivot` / `from_pivot`), whichever method has them; the few
constraints of one method are spelled out below."""

from __future__ import annotations

from summarizer.augment import methods
from summarizer.errors import UserError

LANGUAGE_KEYS = ("prompt", "templates", "to_pivot", "from_pivot")  # {language: text} options


def check_config(cfg, names: list[str], language: str) -> None:
    """`cfg` is the `augmentation` node, `names` the enabled methods."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(f"augmentation.{message}")

    for name in names:
        sub = cfg[name]
        if "fraction" in sub:
            need(0 <= sub.fraction <= 1, f"{name}.fraction={sub.fraction}: expected 0 to 1")
        if "copies" in sub:
            need(sub.copies >= 1, f"{name}.copies={sub.copies}: expected 1 or more")
        for key in LANGUAGE_KEYS:
            if key in sub:
                need(
                    bool(sub[key].get(language)),
                    f"{name}.{key} has no entry for data.language={language!r}: add "
                    f"augmentation.{name}.{key}.{language}=... (see conf/augmentation/{name}.yaml)",
                )
    if "instruction_variants" in names:
        sub, n = cfg.instruction_variants, len(cfg.instruction_variants.templates[language])
        need(sub.copies <= n, f"instruction_variants.copies={sub.copies}: only {n} templates")
    if "local_paraphrase" in names:
        need(
            "{text}" in cfg.local_paraphrase.prompt[language],
            f"local_paraphrase.prompt.{language} needs a {{text}} slot for the utterance",
        )
    if "synthetic" in names:
        sub = cfg.synthetic
        need(sub.per_topic >= 1, f"synthetic.per_topic={sub.per_topic}: expected 1 or more")
        need(sub.max_rows >= 0, f"synthetic.max_rows={sub.max_rows}: expected 0 or more")
    f = cfg.filters
    need(
        0 < f.min_length_ratio <= f.max_length_ratio,
        f"filters: need 0 < min_length_ratio ({f.min_length_ratio}) <= max_length_ratio "
        f"({f.max_length_ratio})",
    )
    need(0 < f.max_similarity <= 1, f"filters.max_similarity={f.max_similarity}: expected (0, 1]")
    need(
        0 <= f.min_language_share <= 1,
        f"filters.min_language_share={f.min_language_share}: expected 0 to 1",
    )
    if any(methods.get(name).api for name in names):
        api = cfg.api
        need(
            api.base_url.startswith(("http://", "https://")),
            f"api.base_url={api.base_url!r}: expected an http(s) URL",
        )
        need(api.concurrency >= 1, f"api.concurrency={api.concurrency}: expected 1 or more")
        need(api.max_retries >= 0, f"api.max_retries={api.max_retries}: expected 0 or more")
        need(api.timeout > 0, f"api.timeout={api.timeout}: expected seconds > 0")
