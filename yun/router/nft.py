"""The one module that owns the router's nftables table ``ip yun_router``.

The translation is STATELESS (``notrack`` and payload rewrites, no conntrack NAT), so any
router can handle any packet of any flow: the paths between the routers and the nodes
may be asymmetric (in through router 1, out through router 2), and a router that
restarts or is added later needs no flow state. nft updates the IP and L4 checksums of
the payload it rewrites.

Inbound (raw prerouting, priority -300), for a packet to a public address:
``notrack``, mark it inbound, then ``ip daddr`` through ``mono_dnat`` (public → VM) or,
for a public port, ``ip daddr . dport`` through ``share_<p>_daddr`` (→ VM address) and
then ``ip daddr . dport`` (the new VM address and the public port) through
``share_<p>_dport`` (→ VM port).

Outbound (a packet from a mapped VM address): ``notrack`` and mark it outbound in raw
prerouting; in postrouting ``ip saddr`` through ``mono_snat`` (VM → public) or
``ip saddr . sport`` through ``share_<p>_sport`` (→ public port) then ``ip saddr .
sport`` (VM address and the public port) through ``share_<p>_saddr`` (→ public
address). An outbound packet still carrying a VM address after that is dropped: a
share VM's own connections and unmapped ports never leave with a private source.

The forward chain (policy drop) lets through inbound packets now addressed to a mapped
VM and outbound packets of mapped VMs, nothing else.

Every forwarded packet runs these chains, so they stop early: a packet not marked for a
chain's direction leaves it at once, and the last translation of a packet ends its chain.

A change is applied as element deletions and additions worked out from the mappings that
went or came (:class:`ElementCounts`), through libnftables in the router process.

:func:`table_document` builds the whole table as one ``nft -j`` document (applied in
one transaction: the table is created, deleted and made again, so it is replaced
atomically), :func:`element_changes` / :func:`changes_document` (and
:func:`diff_document` over two rule sets) the element additions and deletions between two
rule sets (one transaction too), and :func:`live_state` / :func:`desired_state` the
comparable form used to find drift. Those are pure; :class:`NftTable` applies them,
through libnftables in the process (or the ``nft`` command when the library is missing).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from yun.proto.network import RouterRuleSet
from yun.router.libnft import Libnftables, LibnftablesError

log = logging.getLogger("yun.router.nft")

FAMILY = "ip"
TABLE = "yun_router"
MARK_IN = 0x7901  # an inbound packet to a public address
MARK_OUT = 0x7902  # an outbound packet of a mapped VM
PROTOCOLS = ("tcp", "udp")
#: A document up to this size (a change of a few hundred elements) is applied by
#: libnftables inline in the event loop rather than in a thread.
INLINE_BYTES = 32 * 1024

Json = dict[str, Any]
Elements = dict[str, set[tuple[Any, ...]]]
#: Per set/map name: the elements to delete and the elements to add.
Changes = dict[str, tuple[set[tuple[Any, ...]], set[tuple[Any, ...]]]]


def _share_maps(proto: str) -> list[str]:
    return [f"share_{proto}_{what}" for what in ("daddr", "dport", "sport", "saddr")]


# map/set name -> (key type, data type or None for a set)
MAP_TYPES: dict[str, tuple[Any, str | None]] = {
    "public_addrs": ("ipv4_addr", None),
    "vm_addrs": ("ipv4_addr", None),
    "mono_dnat": ("ipv4_addr", "ipv4_addr"),
    "mono_snat": ("ipv4_addr", "ipv4_addr"),
}
for _p in PROTOCOLS:
    MAP_TYPES[f"share_{_p}_daddr"] = (["ipv4_addr", "inet_service"], "ipv4_addr")
    MAP_TYPES[f"share_{_p}_dport"] = (["ipv4_addr", "inet_service"], "inet_service")
    MAP_TYPES[f"share_{_p}_sport"] = (["ipv4_addr", "inet_service"], "inet_service")
    MAP_TYPES[f"share_{_p}_saddr"] = (["ipv4_addr", "inet_service"], "ipv4_addr")


#: One mapping as far as the table is concerned: ``("mono", public, vm)`` or
#: ``("port", protocol, public, public_port, vm, vm_port)`` (the VM's uuid plays no part).
Mapping = tuple[Any, ...]


def mappings(rules: RouterRuleSet) -> set[Mapping]:
    """The mappings of ``rules`` in the form :func:`mapping_elements` takes."""
    out: set[Mapping] = {("mono", m.public_ip, m.vm_ip) for m in rules.mono}
    out.update(("port", p.protocol, p.public_ip, p.public_port, p.vm_ip, p.vm_port)
               for p in rules.ports)
    return out


def mapping_elements(mapping: Mapping) -> list[tuple[str, tuple[Any, ...]]]:
    """The (set or map name, element) pairs one mapping puts in the table. Several
    mappings may put the same element (a public address carrying several ports, a VM
    with several mappings): the table holds it while one of them is there."""
    if mapping[0] == "mono":
        _, public, vm = mapping
        return [("public_addrs", (public,)), ("vm_addrs", (vm,)),
                ("mono_dnat", (public, vm)), ("mono_snat", (vm, public))]
    _, proto, public, public_port, vm, vm_port = mapping
    pre = f"share_{proto}_"
    return [("public_addrs", (public,)), ("vm_addrs", (vm,)),
            (pre + "daddr", (public, public_port, vm)),
            (pre + "dport", (vm, public_port, vm_port)),
            (pre + "sport", (vm, vm_port, public_port)),
            (pre + "saddr", (vm, public_port, public))]


def elements(rules: RouterRuleSet) -> Elements:
    """The content of every set and map for ``rules``: tuples (key..., data)."""
    out: Elements = {name: set() for name in MAP_TYPES}
    for m in mappings(rules):
        for name, item in mapping_elements(m):
            out[name].add(item)
    return out


class ElementCounts:
    """The table's content as reference counts (how many mappings put each element),
    so that a change is worked out from the mappings that went and came alone, without
    the elements of the 10,000 that stayed."""

    def __init__(self, maps: set[Mapping]) -> None:
        self.mappings = set(maps)
        self.counts: dict[tuple[str, tuple[Any, ...]], int] = {}
        for m in self.mappings:
            for key in mapping_elements(m):
                self.counts[key] = self.counts.get(key, 0) + 1

    def elements(self) -> Elements:
        """The content, as :func:`elements` gives it."""
        out: Elements = {name: set() for name in MAP_TYPES}
        for name, item in self.counts:
            out[name].add(item)
        return out

    def change_to(self, new: set[Mapping]) -> Changes:
        """Become the content of ``new``; the element changes that takes (the same as
        :func:`element_changes` between the two contents)."""
        gone: dict[str, set[tuple[Any, ...]]] = {}
        came: dict[str, set[tuple[Any, ...]]] = {}
        for m in self.mappings - new:
            for key in mapping_elements(m):
                left = self.counts[key] - 1
                if left:
                    self.counts[key] = left
                else:
                    del self.counts[key]
                    gone.setdefault(key[0], set()).add(key[1])
        for m in new - self.mappings:
            for key in mapping_elements(m):
                had = self.counts.get(key, 0)
                self.counts[key] = had + 1
                if not had:
                    if key[1] in gone.get(key[0], ()):  # went with one mapping, came back
                        gone[key[0]].discard(key[1])
                    else:
                        came.setdefault(key[0], set()).add(key[1])
        self.mappings = set(new)
        return {name: (gone.get(name, set()), came.get(name, set())) for name in MAP_TYPES
                if gone.get(name) or came.get(name)}


def _elems_json(name: str, items: Any) -> list[Any]:
    """The ``nft -j`` form of ``items`` of set or map ``name``, in sorted order (one
    comprehension per kind: this runs for 50,000 elements at a full sync)."""
    key_type, data_type = MAP_TYPES[name]
    ordered = sorted(items)
    if data_type is None:
        return [i[0] for i in ordered]
    if isinstance(key_type, list):
        return [[{"concat": list(i[:-1])}, i[-1]] for i in ordered]
    return [list(i) for i in ordered]


def _payload(proto: str, fld: str) -> Json:
    return {"payload": {"protocol": proto, "field": fld}}


def _mark(value: int) -> Json:
    return {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": value}}


def _mark_not(value: int) -> Json:
    return {"match": {"op": "!=", "left": {"meta": {"key": "mark"}}, "right": value}}


def _set_by_map(target: Json, key: Json, name: str) -> Json:
    return {"mangle": {"key": target, "value": {"map": {"key": key, "data": f"@{name}"}}}}


def _concat(*parts: Json) -> Json:
    return {"concat": list(parts)}


def _rules(wan: Sequence[str] = ()) -> dict[str, list[list[Json]]]:
    """Every chain's rules (the expressions); each gets a comment ``yun:<chain>:<n>`` so
    that a rule edited or deleted by hand is found by comparing the comments. ``wan``:
    when given, only packets arriving on these interfaces are translated inbound."""
    daddr, saddr = _payload("ip", "daddr"), _payload("ip", "saddr")
    only_wan: list[Json] = [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}},
                                       "right": {"set": sorted(wan)}}}] if wan else []
    # Every packet through the router runs these chains, so the rules are ordered to stop
    # as early as possible (fewer rules in the hot path): a packet not marked for a chain's
    # direction leaves it at once ("mark != X accept"), and a translation that is the
    # last one for its packet ends the chain ("... accept"; its rule breaks off before
    # the accept when the map has no entry, and the next rule is tried). The verdicts are
    # those of the earlier form: every rule skipped needed the mark or the map entry.
    pre: list[list[Json]] = [
        [*only_wan, {"match": {"op": "==", "left": daddr, "right": "@public_addrs"}},
         {"notrack": None}, {"mangle": {"key": {"meta": {"key": "mark"}}, "value": MARK_IN}}],
        [{"match": {"op": "==", "left": saddr, "right": "@vm_addrs"}},
         {"notrack": None}, {"mangle": {"key": {"meta": {"key": "mark"}}, "value": MARK_OUT}}],
        [_mark_not(MARK_IN), {"accept": None}],
        [_set_by_map(daddr, daddr, "mono_dnat"), {"accept": None}],
    ]
    post: list[list[Json]] = [[_mark_not(MARK_OUT), {"accept": None}],
                              [_set_by_map(saddr, saddr, "mono_snat"), {"accept": None}]]
    for proto in PROTOCOLS:
        dport, sport = _payload(proto, "dport"), _payload(proto, "sport")
        l4 = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": proto}}
        pre.append([l4, _set_by_map(daddr, _concat(daddr, dport), f"share_{proto}_daddr")])
        pre.append([l4, _set_by_map(dport, _concat(daddr, dport), f"share_{proto}_dport"),
                    {"accept": None}])
        post.append([l4, _set_by_map(sport, _concat(saddr, sport), f"share_{proto}_sport")])
        post.append([l4, _set_by_map(saddr, _concat(saddr, sport), f"share_{proto}_saddr"),
                     {"accept": None}])
    post.append([{"match": {"op": "==", "left": saddr, "right": "@vm_addrs"}},
                 {"drop": None}])
    forward: list[list[Json]] = [
        [_mark(MARK_IN), {"match": {"op": "==", "left": daddr, "right": "@vm_addrs"}},
         {"accept": None}],
        [_mark(MARK_OUT), {"accept": None}],
    ]
    return {"prerouting": pre, "postrouting": post, "forward": forward}


CHAINS: dict[str, tuple[str, int, str]] = {  # name -> hook, priority, policy
    "prerouting": ("prerouting", -300, "accept"),
    "postrouting": ("postrouting", 100, "accept"),
    "forward": ("forward", 0, "drop"),
}


def table_document(rules: RouterRuleSet, wan: Sequence[str] = ()) -> Json:
    """The whole table for ``rules`` as one ``nft -j`` document that replaces it atomically
    (add, delete and add again the table: the delete never fails for a missing table)."""
    return _table_document(elements(rules), wan)


def _table_document(content: Elements, wan: Sequence[str]) -> Json:
    table = {"family": FAMILY, "name": TABLE}
    cmds: list[Json] = [{"add": {"table": table}}, {"delete": {"table": table}},
                        {"add": {"table": table}}]
    for name, (key_type, data_type) in MAP_TYPES.items():
        body: Json = {"family": FAMILY, "table": TABLE, "name": name, "type": key_type}
        if data_type is not None:
            body["map"] = data_type
        if content[name]:
            body["elem"] = _elems_json(name, content[name])
        cmds.append({"add": {"map" if data_type else "set": body}})
    for chain, (hook, prio, policy) in CHAINS.items():
        cmds.append({"add": {"chain": {"family": FAMILY, "table": TABLE, "name": chain,
                                       "type": "filter", "hook": hook, "prio": prio,
                                       "policy": policy}}})
    for chain, rule_list in _rules(wan).items():
        for n, expr in enumerate(rule_list):
            cmds.append({"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": chain,
                                          "expr": expr, "comment": f"yun:{chain}:{n}"}}})
    return {"nftables": cmds}


def element_changes(before: Elements, after: Elements) -> Changes:
    """Which elements of each set and map go and which come to turn the content
    ``before`` into ``after`` (only the names with a change). A map key whose data
    changes is one element gone (old data) and one come (new data)."""
    out: Changes = {}
    for name in MAP_TYPES:
        old, new = before.get(name, set()), after.get(name, set())
        if old == new:  # the common case of a small change: most maps are untouched
            continue
        gone, came = old - new, new - old
        if gone or came:
            out[name] = (gone, came)
    return out


def changes_document(changes: Changes) -> Json | None:
    """The ``nft -j`` document applying ``changes`` in one transaction: every deletion
    first (a key whose data changes is deleted before it is added again), or None when
    there is nothing to do."""
    deletes: list[Json] = []
    adds: list[Json] = []
    for name, (gone, came) in changes.items():
        if gone:
            deletes.append({"delete": {"element": {
                "family": FAMILY, "table": TABLE, "name": name,
                "elem": _elems_json(name, gone)}}})
        if came:
            adds.append({"add": {"element": {
                "family": FAMILY, "table": TABLE, "name": name,
                "elem": _elems_json(name, came)}}})
    if not deletes and not adds:
        return None
    return {"nftables": deletes + adds}


def diff_document(old: RouterRuleSet, new: RouterRuleSet) -> Json | None:
    """The element deletions then additions that turn the table of ``old`` into that of
    ``new`` (one transaction), or None when nothing changes. A key whose data changes is
    deleted and added again in the same transaction."""
    return changes_document(element_changes(elements(old), elements(new)))


@dataclass(frozen=True)
class TableState:
    """The comparable content of the table: elements per set/map, rule comments per
    chain, and each chain's hook, priority and policy."""

    elements: dict[str, frozenset[tuple[Any, ...]]] = field(default_factory=dict)
    rules: dict[str, tuple[str, ...]] = field(default_factory=dict)
    chains: dict[str, tuple[str, int, str]] = field(default_factory=dict)


def desired_state(rules: RouterRuleSet, wan: Sequence[str] = ()) -> TableState:
    """What the live table must hold for ``rules``."""
    return TableState(
        elements={k: frozenset(v) for k, v in elements(rules).items()},
        rules={c: tuple(f"yun:{c}:{n}" for n in range(len(r))) for c, r in _rules(wan).items()},
        chains=dict(CHAINS))


def _item(value: Any) -> tuple[Any, ...]:
    if isinstance(value, dict) and "concat" in value:
        return tuple(value["concat"])
    return (value,)


def live_state(listing: Json) -> TableState:
    """The comparable form of ``nft -j list table ip yun_router`` output."""
    elems: dict[str, set[tuple[Any, ...]]] = {}
    rules: dict[str, list[str]] = {}
    chains: dict[str, tuple[str, int, str]] = {}
    for entry in listing.get("nftables", []):
        for kind in ("set", "map"):
            if kind in entry:
                body = entry[kind]
                got: set[tuple[Any, ...]] = set()
                for e in body.get("elem", []):
                    if isinstance(e, dict) and "elem" in e:  # with timeout/comment info
                        e = e["elem"]["val"]
                    if kind == "map":
                        got.add((*_item(e[0]), e[1]))
                    else:
                        got.add(_item(e))
                elems[body["name"]] = got
        if "chain" in entry:
            c = entry["chain"]
            chains[c["name"]] = (c.get("hook", ""), int(c.get("prio", 0)), c.get("policy", ""))
            rules.setdefault(c["name"], [])
        if "rule" in entry:
            r = entry["rule"]
            rules.setdefault(r["chain"], []).append(r.get("comment", ""))
    return TableState(elements={k: frozenset(v) for k, v in elems.items()},
                      rules={k: tuple(v) for k, v in rules.items()}, chains=chains)


class NftError(RuntimeError):
    """nft refused a document or could not list the table."""


@dataclass
class NftTable:
    """Applies documents to the router's table, in the process's network namespace.

    Through libnftables in the process (:mod:`yun.router.libnft`) when ``library`` is
    true and the library loads: no process start per change, one netlink socket for the
    router's life. Otherwise (or ``library=False``) by running the ``nft`` command, with
    ``timeout``. It remembers the elements of what it last applied, so that an update
    computes the elements of the new rule set only."""

    nft: str = "nft"
    timeout: float = 30.0
    wan: tuple[str, ...] = ()
    library: bool = True
    _lib: Libnftables | None = field(default=None, init=False, repr=False)
    _applied: tuple[RouterRuleSet, ElementCounts] | None = field(default=None, init=False,
                                                                   repr=False)

    def __post_init__(self) -> None:
        if self.library:
            try:
                self._lib = Libnftables()
            except LibnftablesError as exc:
                log.warning("libnftables unavailable, running the nft command instead: %s",
                            exc, extra={"nft": self.nft})

    @property
    def backend(self) -> str:
        """``libnftables`` or ``nft`` (the command)."""
        return "libnftables" if self._lib is not None else "nft"

    async def _run(self, *args: str, stdin: bytes | None = None) -> str:
        proc = await asyncio.create_subprocess_exec(
            self.nft, *args, stdin=asyncio.subprocess.PIPE if stdin is not None else None,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            # Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation.
            async with asyncio.timeout(self.timeout):
                out, err = await proc.communicate(stdin)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise NftError(f"nft {' '.join(args)} took more than {self.timeout} s") from None
        if proc.returncode != 0:
            raise NftError(f"nft {' '.join(args)} failed ({proc.returncode}): "
                           f"{err.decode(errors='replace').strip()[:2000]}")
        return out.decode()

    async def _lib_run(self, lib: Libnftables, what: str, command: str,
                       inline: bool = False) -> str:
        # In a thread: a 10,000-element transaction or listing takes a few hundred ms,
        # and the router keeps answering notices meanwhile (ctypes releases the GIL).
        # A small change runs inline: it takes well under a millisecond, less than the
        # two thread wake-ups of a hop, which on a loaded machine cost tens of ms.
        try:
            if inline:
                return lib.run(command)
            return await asyncio.to_thread(lib.run, command)
        except LibnftablesError as exc:
            raise NftError(f"libnftables {what} failed: {exc}") from None

    async def apply(self, document: Json) -> None:
        """Apply one ``nft -j`` document in one transaction (all or nothing)."""
        self._applied = None  # unknown until the caller says what the table holds
        text = json.dumps(document)
        if self._lib is not None:
            await self._lib_run(self._lib, "apply", text, inline=len(text) <= INLINE_BYTES)
        else:
            await self._run("-j", "-f", "-", stdin=text.encode())

    async def replace(self, rules: RouterRuleSet) -> None:
        """Replace the whole table with the one of ``rules`` (atomic)."""
        counts = ElementCounts(mappings(rules))
        await self.apply(_table_document(counts.elements(), self.wan))
        self._applied = (rules, counts)

    async def update(self, old: RouterRuleSet, new: RouterRuleSet) -> bool:
        """Apply the difference between ``old`` (what the table holds) and ``new``;
        whether anything changed. When ``old`` is what this table last applied, only the
        mappings that went or came are looked at."""
        counts = (self._applied[1] if self._applied is not None and self._applied[0] is old
                  else ElementCounts(mappings(old)))
        self._applied = None  # counts changes below: valid again once applied
        doc = changes_document(counts.change_to(mappings(new)))
        if doc is not None:
            await self.apply(doc)
        self._applied = (new, counts)
        return doc is not None

    async def state(self) -> TableState | None:
        """The live table's comparable content, or None when the table does not exist."""
        try:
            if self._lib is not None:
                out = await self._lib_run(self._lib, "list", json.dumps(
                    {"nftables": [{"list": {"table": {"family": FAMILY, "name": TABLE}}}]}))
            else:
                out = await self._run("-j", "list", "table", FAMILY, TABLE)
        except NftError as exc:
            if "No such file" in str(exc) or "does not exist" in str(exc):
                return None
            raise
        return live_state(json.loads(out))

    async def delete(self) -> None:
        """Remove the table (no error when it is absent)."""
        table = {"family": FAMILY, "name": TABLE}
        await self.apply({"nftables": [{"add": {"table": table}},
                                       {"delete": {"table": table}}]})

    def close(self) -> None:
        """Free the libnftables context (the table stays)."""
        if self._lib is not None:
            self._lib.close()
            self._lib = None
