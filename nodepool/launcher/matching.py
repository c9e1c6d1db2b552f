"""Which node serves which requested label, when a node may carry several labels.

A static host registered with labels ``[a, b]`` can serve a request for ``a`` or for ``b``,
once.  Handing nodes out greedily can strand a request ``[a, b]`` (the two-label node taken for
``a`` although a one-label node could have served it), so assignments are a bipartite matching,
found by augmenting paths: requests and candidate lists are small.
"""


def match_labels(wanted, label_sets):
    """A largest assignment of ``wanted`` positions to ``label_sets`` indexes.

    ``wanted`` is a list of labels (a request's node types, in order); ``label_sets`` the labels
    of each candidate (earlier candidates are preferred).  Returns ``{position: candidate index}``
    with each candidate used at most once; it covers every position when that is possible.
    """
    owner = {}                                  # candidate index -> position it serves

    def place(pos, seen):
        for c, labels in enumerate(label_sets):
            if wanted[pos] in labels and c not in seen:
                seen.add(c)
                if c not in owner or place(owner[c], seen):
                    owner[c] = pos
                    return True
        return False

    for pos in range(len(wanted)):
        place(pos, set())
    return {pos: c for c, pos in owner.items()}


def can_match_all(wanted, label_sets):
    """Whether every wanted label gets its own candidate."""
    return len(wanted) <= len(label_sets) and len(match_labels(wanted, label_sets)) == len(wanted)
