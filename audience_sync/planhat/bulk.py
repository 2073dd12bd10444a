"""The bulk upsert: up to 5,000 contacts (or companies) per request, one request at a time;
a 400 is halved to isolate the items Planhat refuses."""

from __future__ import annotations

from collections.abc import Sequence

from ..config import PlanhatSettings
from .answers import bulk_answer, bulk_failures, counted_shortfall, http_error, not_created, unproven
from .endpoints import COMPANIES_PATH, ENDUSERS_PATH
from .exchange import Exchange, GaveUp
from .outcome import Outcome, Result, combine
from .payloads import Contact, build_company, build_enduser, encode


class BulkDelivery:
    """Bulk upserts (`PUT /endusers`, or `PUT /companies` for account-level keys) of up to
    `batch_size` items, strictly one after another."""

    def __init__(self, settings: PlanhatSettings, exchange: Exchange) -> None:
        self.chunk_size = max(1, settings.batch_size)
        self.exchange = exchange

    def send(self, contacts: Sequence[Contact]) -> Outcome:
        results: list[Result] = []
        for start in range(0, len(contacts), self.chunk_size):
            results.extend(self._deliver(contacts[start : start + self.chunk_size]))
        return combine(results, stop=self.exchange.halted)

    def _deliver(self, batch: Sequence[Contact], doubt: bool = False) -> list[Result]:
        """`doubt`: an earlier request carrying these items may have been applied. A chunk is
        all contacts or all companies (account level), never both."""
        if batch and batch[0].meta.account:
            path, body = COMPANIES_PATH, encode([build_company(c) for c in batch])
        else:
            path, body = ENDUSERS_PATH, encode([build_enduser(c) for c in batch])
        reply = self.exchange.request("PUT", path, body)
        if isinstance(reply, GaveUp):
            return [Result(c.ref, reply.text, doubt or reply.in_doubt) for c in batch]
        doubt = doubt or reply.in_doubt
        if reply.status == 400 and len(batch) > 1:
            # Halve to isolate the items Planhat refuses; the rest still get written.
            middle = len(batch) // 2
            return self._deliver(batch[:middle], doubt) + self._deliver(batch[middle:], doubt)
        if not 200 <= reply.status < 300:
            error = http_error(reply, self.exchange.scrub)
            return [Result(c.ref, error, doubt) for c in batch]
        data = bulk_answer(reply)
        if data is None:
            stop = unproven(reply, self.exchange.where(path), self.exchange.scrub,
                            "without the bulk upsert's JSON counters")  # fmt: skip
            self.exchange.halt(stop)
            return [Result(c.ref, str(stop), in_doubt=True) for c in batch]
        failed, unattributed = bulk_failures(data, reply.status, batch, self.exchange.scrub)
        if unattributed is not None:  # some of the batch may have been written
            return [Result(c.ref, unattributed, in_doubt=True) for c in batch]
        shortfall = counted_shortfall(data, len(batch), len(failed))
        if failed:
            # An exit (`false`) or a cleared trait (`null`) for a contact Planhat does not have
            # is done: nothing there holds the value. Planhat cannot create the contact (it
            # needs a company), and resending it would fail forever.
            for ref in not_created(data, batch) & {c.ref for c in batch if _clears(c)}:
                failed.pop(ref, None)
        return [
            Result(c.ref, failed[c.ref], doubt)
            if c.ref in failed
            else Result(c.ref, shortfall, in_doubt=True)
            if shortfall
            else Result(c.ref)
            for c in batch
        ]

    def close(self) -> None:
        pass


def _clears(contact: Contact) -> bool:
    """Every value the item carries is `false` or `null`: a contact without it is as wanted."""
    return all(value is None or value is False for value in contact.values.values())
