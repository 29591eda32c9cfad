"""Drive a running Phylax through fhirpy, an independent FHIR client library.

Environment: PHYLAX_FHIR_URL, PHYLAX_TOKEN, PHYLAX_CA. Exits non-zero on the
first failed expectation. Run by tests/interop.rs.
"""
import os
import sys

from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import OperationOutcome, ResourceNotFound


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


client = SyncFHIRClient(
    os.environ["PHYLAX_FHIR_URL"],
    authorization="Bearer " + os.environ["PHYLAX_TOKEN"],
    requests_config={"verify": os.environ["PHYLAX_CA"]},
)

patient = client.resource("Patient", name=[{"family": "Interop", "given": ["Test"]}], birthDate="1990-01-01")
patient.save()
check(patient.id is not None, "create assigns an id")
check(patient["meta"]["versionId"] == "1", "create returns version 1")

got = client.reference("Patient", patient.id).to_resource()
check(got["name"][0]["family"] == "Interop", "read returns the stored resource")

got["gender"] = "other"
got.save()
check(got["meta"]["versionId"] == "2", "update through PUT makes version 2")

for i in range(4):
    obs = client.resource(
        "Observation", status="final", code={"text": f"reading {i}"}, subject=patient.to_reference()
    )
    obs.save()
found = client.resources("Observation").limit(3).fetch_all()
check(len(found) == 4, "search paging follows next links to all results")

by_id = client.resources("Patient").search(_id=patient.id).fetch()
check(len(by_id) == 1 and by_id[0].id == patient.id, "search by _id")

# --- Search: strings, tokens, dates, sort, include, chains, _has, count.
patient2 = client.resource(
    "Patient",
    name=[{"family": "Interopsson", "given": ["Second"]}],
    identifier=[{"system": "urn:oid:1.2.3", "value": "IOP-2"}],
    birthDate="1980-05-06",
)
patient2.save()
by_prefix = client.resources("Patient").search(family="interop").fetch_all()
check({p.id for p in by_prefix} == {patient.id, patient2.id}, "string search is a case-insensitive prefix")
exact = client.resources("Patient").search(**{"family:exact": "Interop"}).fetch_all()
check([p.id for p in exact] == [patient.id], "family:exact")
by_ident = client.resources("Patient").search(identifier="urn:oid:1.2.3|IOP-2").fetch_all()
check([p.id for p in by_ident] == [patient2.id], "token search system|code")
by_birth = client.resources("Patient").search(birthdate="1980-05").fetch_all()
check([p.id for p in by_birth] == [patient2.id], "blind birth date at month precision")
ordered = client.resources("Patient").search(family="interop").sort("-birthdate").fetch_all()
check([p.id for p in ordered] == [patient.id, patient2.id], "_sort descending")
check(client.resources("Patient").search(family="interop").count() == 2, "count() via total")
raw = client.resources("Observation").search(subject=f"Patient/{patient.id}").include("Observation", "subject").fetch_raw()
kinds = sorted({(e["resource"]["resourceType"], e["search"]["mode"]) for e in raw["entry"]})
check(kinds == [("Observation", "match"), ("Patient", "include")], "_include")
raw = client.resources("Patient").search(_id=patient.id).revinclude("Observation", "subject").fetch_raw()
check(sum(1 for e in raw["entry"] if e["search"]["mode"] == "include") == 4, "_revinclude")
chained = client.resources("Observation").search(**{"subject:Patient.name": "Interop"}).fetch_all()
check(len(chained) == 4, "chained search subject:Patient.name")
has = client.resources("Patient").search(**{"_has:Observation:subject:code:text": "reading"}).fetch_all()
check([p.id for p in has] == [patient.id], "_has reverse chaining")

# --- Transaction with urn:uuid references, then $everything.
tx = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [
        {
            "fullUrl": "urn:uuid:0b1d6a4e-2b7c-4f0e-9a51-3c2d1e0f9a88",
            "resource": {"resourceType": "Patient", "name": [{"family": "Txpatient"}]},
            "request": {"method": "POST", "url": "Patient"},
        },
        {
            "fullUrl": "urn:uuid:6e0c2f7a-8d4b-4c39-b1a2-9f8e7d6c5b4a",
            "resource": {
                "resourceType": "Encounter",
                "status": "finished",
                "class": {"code": "AMB"},
                "subject": {"reference": "urn:uuid:0b1d6a4e-2b7c-4f0e-9a51-3c2d1e0f9a88"},
            },
            "request": {"method": "POST", "url": "Encounter"},
        },
        {
            "resource": {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "tx"},
                "subject": {"reference": "urn:uuid:0b1d6a4e-2b7c-4f0e-9a51-3c2d1e0f9a88"},
                "encounter": {"reference": "urn:uuid:6e0c2f7a-8d4b-4c39-b1a2-9f8e7d6c5b4a"},
            },
            "request": {"method": "POST", "url": "Observation"},
        },
    ],
}
resp = client.execute("", method="post", data=tx)
check(resp["type"] == "transaction-response", "transaction answers a transaction-response")
check([e["response"]["status"] for e in resp["entry"]] == ["201 Created"] * 3, "every entry created")
tx_pid = resp["entry"][0]["resource"]["id"]
check(
    resp["entry"][2]["resource"]["subject"]["reference"] == f"Patient/{tx_pid}",
    "urn:uuid references resolved to server ids",
)
everything = client.execute(f"Patient/{tx_pid}/$everything", method="get")
types = sorted(e["resource"]["resourceType"] for e in everything["entry"])
check(types == ["Encounter", "Observation", "Patient"], "$everything returns the compartment")
bad = dict(tx)
bad["entry"] = tx["entry"] + [
    {"resource": {"resourceType": "Observation", "code": {"text": "no status"}}, "request": {"method": "POST", "url": "Observation"}}
]
try:
    client.execute("", method="post", data=bad)
    check(False, "a failing transaction is refused")
except OperationOutcome:
    check(True, "a failing transaction is refused with an OperationOutcome")
check(
    client.resources("Patient").search(family="txpatient").count() == 1,
    "a failed transaction left nothing behind",
)

try:
    client.resource("Patient", nonsense="x").save()
    check(False, "an invalid resource is refused")
except OperationOutcome:
    check(True, "an invalid resource is refused with an OperationOutcome")

patient.delete()
try:
    client.reference("Patient", patient.id).to_resource()
    check(False, "a deleted resource is gone")
except ResourceNotFound:
    check(True, "a deleted resource is gone (410)")

print("fhirpy interop: all checks passed")
