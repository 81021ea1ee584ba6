"""Vocabularies of the sample issue titles: templates with slots, per label.

A term is ``(text, since_day, trend)``: it appears from ``since_day`` on, and
its weight is multiplied by ``trend`` every day after that (capped), so new
terms take over and old ones (``trend < 1``) fade. That is the drift a model
trained on early days has to cope with.
"""

from __future__ import annotations

Term = tuple[str, int, float]
Vocab = dict[str, list[Term]]


def terms(*texts: str, since: int = 1, trend: float = 1.0) -> list[Term]:
    return [(text, since, trend) for text in texts]


# Slots any label's templates may use; they carry no label signal.
SHARED: Vocab = {
    "ctx": [
        *terms("", "", "", "after upgrade", "on Windows", "in CI", "on macOS", "in a monorepo"),
        *terms("with Python 3.12", "since 3.0", trend=1.1),
        *terms("with Python 3.13", "since 3.50", since=4, trend=1.5),
    ],
}

TEMPLATES: dict[str, list[str]] = {
    "data-sync": [
        "{cmd} fails with {remote} remote {ctx}",
        "{cmd} is slow for {size} on {remote}",
        "{cmd} hangs when {sync_cond}",
        "{cmd} re-downloads {cache_obj} already in the cache",
        "{cache_obj} missing from {remote} after {cmd}",
        "{remote} remote: {auth_problem}",
        "support {feature} for {remote} remotes",
        "{cmd} reports wrong {sync_stat} {ctx}",
        "checksum mismatch on {cmd} from {remote}",
    ],
    "experiments": [
        "{expcmd} hides {exp_thing} from {exp_set}",
        "{expcmd} fails when {exp_cond}",
        "{exp_set} lost after {exp_event}",
        "cannot {exp_verb} experiment {exp_source}",
        "{expcmd} is slow with {exp_scale}",
        "{exp_thing} not tracked {ctx} for {exp_set}",
        "add option to {exp_verb} {exp_set} by {exp_thing}",
        "{expcmd}: {exp_thing} column shows wrong values",
    ],
    "plots": [
        "{tmpl} template renders {plot_problem}",
        "{plotcmd} shows {plot_problem} with {fmt} files",
        "{plotcmd} ignores {plot_opt}",
        "support {plot_opt} in {plotcmd}",
        "{plot_kind} plot has {plot_problem} {ctx}",
        "{plotcmd} fails for {fmt} {plot_source}",
        "cannot set {plot_opt} for {plot_kind} plots",
    ],
}

SLOTS: dict[str, Vocab] = {
    "data-sync": {
        "cmd": [
            *terms("dvc pull", "dvc push", "dvc fetch", "dvc checkout", "dvc add", "dvc get"),
            *terms("dvc gc", "dvc import-url", "dvc status --cloud", trend=0.85),
            *terms("dvc update", since=2, trend=1.2),
            *terms("dvc data status", since=3, trend=1.6),
            *terms("dvc import --no-download", "dvc pull --allow-missing", since=4, trend=1.7),
        ],
        "remote": [
            *terms("S3", "GCS", "Azure", "SSH", "local", "HTTP"),
            *terms("HDFS", "WebDAV", "Google Drive", "OSS", trend=0.75),
            *terms("MinIO", since=2, trend=1.2),
            *terms("Cloudflare R2", "version-aware S3", since=4, trend=1.8),
        ],
        "size": terms("large datasets", "many small files", "a 100GB dataset", "nested folders",
                      "image datasets", "shared caches"),
        "sync_cond": [
            *terms("the remote has millions of files", "credentials expire mid-transfer",
                   "jobs is set to 64", "the cache is on NFS", "using a shared cache",
                   "the network drops"),
            *terms("the data index is locked", since=3, trend=1.6),
            *terms("cloud versioning is enabled", since=4, trend=1.8),
        ],
        "cache_obj": terms("files", ".dir objects", "cache entries", "partial downloads",
                           "symlinked outputs", "hardlinked files"),
        "auth_problem": [
            *terms("credentials not picked up from profile", "access denied with IAM role",
                   "token refresh fails", "custom endpoint ignored", "proxy settings ignored"),
            *terms("SSO login not supported", since=3, trend=1.5),
        ],
        "feature": [
            *terms("parallel uploads", "resumable transfers", "checksum verification",
                   "server-side encryption", "requester pays"),
            *terms("cloud versioning", "worktree remotes", since=4, trend=1.8),
        ],
        "sync_stat": terms("file count", "transfer progress", "cache size", "missing cache warning"),
    },
    "experiments": {
        "expcmd": [
            *terms("dvc exp run", "dvc exp show", "dvc exp apply", "dvc exp push", "dvc exp pull",
                   "dvc exp branch", "dvc exp remove"),
            *terms("dvc exp run --temp", "dvc exp gc", trend=0.7),
            *terms("dvc queue start", since=2, trend=1.3),
            *terms("dvc queue logs", "dvc exp save", since=3, trend=1.6),
            *terms("dvclive", "dvc exp rename", since=4, trend=1.8),
        ],
        "exp_thing": [
            *terms("params", "metrics", "commit message", "deps", "custom names", "run time"),
            *terms("checkpoints", trend=0.5),
            *terms("step number", "live metrics", since=3, trend=1.6),
            *terms("hydra overrides", since=4, trend=1.8),
        ],
        "exp_set": [
            *terms("queued experiments", "running experiments", "failed experiments",
                   "workspace experiments", "the baseline commit", "temp runs", "remote experiments"),
            *terms("Studio experiments", since=4, trend=1.8),
        ],
        "exp_cond": [
            *terms("the queue worker is killed", "params.yaml has nested lists",
                   "git HEAD is detached", "the repo has submodules", "running with --jobs 4",
                   "a stage has no outputs"),
            *terms("hydra composition is enabled", since=4, trend=1.8),
        ],
        "exp_event": [
            *terms("git gc", "rebasing main", "a failed run", "exp apply", "restarting the queue"),
            *terms("upgrading dvclive", since=3, trend=1.6),
        ],
        "exp_verb": terms("compare", "rename", "resume", "reproduce", "share", "sort", "filter", "tag"),
        "exp_source": [
            *terms("from a remote", "from a detached HEAD", "by name", "from the queue",
                   "after git stash"),
            *terms("from Studio", since=4, trend=1.8),
        ],
        "exp_scale": terms("hundreds of experiments", "long param files", "many branches",
                           "large metrics files"),
    },
    "plots": {
        "tmpl": [
            *terms("vega", "linear", "confusion", "scatter", "smooth", "simple", "custom"),
            *terms("bar_horizontal", since=3, trend=1.5),
        ],
        "plotcmd": [
            *terms("dvc plots show", "dvc plots diff", "dvc plots modify"),
            *terms("dvc plots templates", trend=0.8),
            *terms("top-level plots", since=3, trend=1.7),
            *terms("the VS Code plots view", since=4, trend=1.8),
        ],
        "plot_problem": terms("an empty axis", "overlapping labels", "wrong colors", "a blank page",
                              "duplicated lines", "no legend", "swapped x and y", "NaN values",
                              "unreadable ticks"),
        "fmt": [*terms("csv", "tsv", "json", "yaml", "png", "nested json"),
                *terms("jpeg", "svg", since=3, trend=1.4)],
        "plot_opt": [
            *terms("x label", "y label", "axis range", "title", "custom templates", "log scale",
                   "the x field"),
            *terms("multiple y fields", since=3, trend=1.6),
            *terms("flexible plot definitions", since=4, trend=1.8),
        ],
        "plot_kind": terms("confusion matrix", "ROC curve", "precision recall", "loss curve",
                           "scatter", "image", "bar"),
        "plot_source": [
            *terms("files from other revisions", "files with missing fields", "files in subfolders",
                   "files with a step column"),
            *terms("dvclive output", since=3, trend=1.6),
        ],
    },
}

# Titles that could be filed under any label: the irreducible ambiguity.
GENERIC_TEMPLATES = [
    "{gcmd} crashes with {exc} {ctx}",
    "unexpected error {ctx}",
    "{gcmd} {gproblem} {ctx}",
    "docs: clarify {gtopic}",
]
GENERIC_SLOTS: Vocab = {
    "gcmd": terms("dvc repro", "dvc status", "dvc init", "dvc config", "dvc doctor", "dvc diff",
                  "dvc dag"),
    "exc": terms("KeyError", "UnicodeDecodeError", "RecursionError", "PermissionError",
                 "ERROR: unexpected error"),
    "gproblem": terms("prints a traceback", "is very slow", "ignores config", "breaks git hooks",
                      "leaves a lock file"),
    "gtopic": terms("the quickstart", "remote config", "params files", "the docs for pipelines",
                    "installation on conda"),
}

# For labels with no vocabulary of their own: the label's words plus a few of these nouns.
FALLBACK_TEMPLATES = [
    "{topic} {fb_noun} {fb_problem} {ctx}",
    "{fb_noun} in {topic} {fb_problem}",
    "support {fb_feature} for {topic} {fb_noun}",
    "{topic}: {fb_noun} {fb_problem}",
]
FALLBACK_NOUNS = [
    "config", "parser", "schema", "index", "cache", "lockfile", "manifest", "worker", "queue",
    "renderer", "exporter", "importer", "scheduler", "registry", "resolver", "validator",
    "template", "session", "adapter", "plugin", "hook", "watcher", "report", "table",
    "widget", "token", "profile", "mirror", "bundle", "snapshot", "graph", "timeline",
]
FALLBACK_SLOTS: Vocab = {
    "fb_problem": terms("fails", "crashes", "is slow", "returns wrong results", "hangs",
                        "breaks after upgrade", "ignores options"),
    "fb_feature": terms("retries", "dry runs", "filters", "batch mode", "custom paths", "progress bars"),
}
