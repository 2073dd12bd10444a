"""Contacts Planhat does not have, sent without a company: Planhat discards them (planhat/docs,
"User Tracking" > "3. Segment" > "Un Assigned Users"), answering 200 on /dock/segment, and its
bulk upsert cannot create them. The fake does the same; these tests prove the loss is reported:
by the bulk run's error, by `check` (test_check.py) and by `reconcile`, end to end through the CLI.
"""

from __future__ import annotations

import json
import logging

import pytest

from tests.conftest import Cli, Project, StartDaemon, query, run, schedule, users, wait_for

NO_COMPANY = {"name": "Trials", "query": "SELECT id AS user_id, email FROM users"}
FAST = "max_requests_per_second = 150"
FAST_READS = "\n[reconcile]\nmax_requests_per_second = 150\n"


def test_on_segment_planhat_discards_them_and_reconcile_names_the_cause(project: Project, cli: Cli) -> None:
    fake = project.planhat
    project.write([NO_COMPANY], planhat=FAST, extra=FAST_READS)
    project.source.set_users(users(range(1, 5)))
    fake.add_contact("u4", "u4@example.com")  # the one contact Planhat already has

    # Planhat answers 200 to every identify: the run cannot tell, and counts them delivered.
    assert run(cli, "sync").code == 0
    assert sorted(u["ref"] for u in fake.unassigned) == ["u1", "u2", "u3"]
    assert fake.find("u1") is None and fake.value("u4", "trials") is True

    result = run(cli, "reconcile")
    assert result.code == 1
    assert " drift " in result.out
    (line,) = [line for line in result.out.splitlines() if line.startswith("trials: missing contact")]
    assert line.startswith("trials: missing contact, e.g. u1, u2, u3; likely cause: no company sent")
    assert "3 of these 3 have no company_id in the source" in line
    assert "return it as the column company_id" in line
    report = json.loads(run(cli, "reconcile", "--json").out)[0]
    assert (report["missing_contact"], report["missing_without_company"]) == (3, 3)


def test_reconcile_counts_only_the_missing_contacts_without_a_company(project: Project, cli: Cli) -> None:
    fake = project.planhat
    query = "SELECT id AS user_id, email, company_id FROM users"
    project.write([{"name": "Trials", "query": query}], planhat=FAST, extra=FAST_READS)
    project.source.set_users(users(range(1, 3)) + users(range(3, 5), company_id=None))
    fake.add_contact("u3")
    fake.add_contact("u4")
    assert run(cli, "sync").code == 0
    for ref in ("u1", "u3"):  # deleted in Planhat: one had a company, one did not
        fake.delete_contact(ref)

    report = json.loads(run(cli, "reconcile", "--json").out)[0]
    assert (report["missing_contact"], report["missing_without_company"]) == (2, 1)
    out = run(cli, "reconcile").out
    assert "1 of these 2 have no company_id in the source" in out


def test_on_the_bulk_transport_planhat_refuses_them_and_the_run_says_so(project: Project, cli: Cli) -> None:
    fake = project.planhat
    project.write([NO_COMPANY], transport="endusers")
    project.source.set_users(users(range(1, 3)))
    fake.add_contact("u2", "u2@example.com")

    result = run(cli, "sync")
    assert result.code == 1
    assert "Planhat did not accept 1 changes" in result.err and "a new contact needs a company" in result.err
    assert fake.find("u1") is None and fake.value("u2", "trials") is True
    assert fake.state()["contacts"] == 1


@pytest.mark.parametrize("transport", ["segment", "endusers"])
def test_with_a_company_id_the_new_contacts_land(project: Project, cli: Cli, transport: str) -> None:
    fake = project.planhat
    query = "SELECT id AS user_id, email, company_id FROM users"
    project.write([{"name": "Trials", "query": query}], transport=transport)
    project.source.set_users(users(range(1, 4), company_id="acme"))
    assert run(cli, "sync").code == 0
    assert [fake.value(f"u{n}", "trials") for n in range(1, 4)] == [True, True, True]
    assert fake.contact("u1")["companyExternalId"] == "acme" and fake.unassigned == []


def test_an_exit_for_a_contact_planhat_never_created_is_done(project: Project, cli: Cli) -> None:
    """A `true` in doubt, then the user leaves: the `false` goes to a contact Planhat does not
    have, which it cannot create (no company). Nothing there holds `true`: the exit is done, not
    resent forever."""
    fake = project.planhat
    project.write([NO_COMPANY], transport="endusers", planhat="max_attempts = 1\ntimeout_seconds = 0.3")
    project.source.set_users(users([1]))
    fake.timeout_next(1)  # held past the client's timeout, then nothing written
    assert run(cli, "sync").code == 1
    assert fake.wait_idle()  # the held request is recorded once its hold ends
    assert query(project.state_url, "SELECT in_doubt FROM pending") in ([(True,)], [(1,)])
    project.source.set_users([])
    result = run(cli, "sync")
    assert result.code == 0, result.err
    assert fake.requests[-1].status == 206 and fake.requests[-1].body == [
        {"externalId": "u1", "email": "u1@example.com", "custom": {"trials": False}}
    ]
    assert fake.find("u1") is None and query(project.state_url, "SELECT count(*) FROM pending") == [(0,)]


def test_the_daemons_reconcile_logs_the_missing_contacts_without_a_company(
    project: Project, start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    fake = project.planhat
    reconciling = '\n[reconcile]\ninterval = "1s"\nmax_requests_per_second = 150\n'
    project.write([NO_COMPANY], planhat=FAST, extra=schedule("1h", "2h") + reconciling)
    project.source.set_users(users(range(1, 3)))
    with caplog.at_level(logging.WARNING, logger="audience_sync.sync.reconcile"):
        start_daemon()
        wait_for(lambda: fake.unassigned, what="the initial sync, discarded by Planhat")
        wait_for(lambda: "have no company_id in the source" in caplog.text, what="the reconcile's warning")
    assert (
        "audience 'trials': 2 of the 2 missing contacts have no company_id in the source; Planhat "
        "discards a contact it does not have unless the call names its company" in caplog.text
    )
