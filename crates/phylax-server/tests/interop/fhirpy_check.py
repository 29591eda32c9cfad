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
