"""The dashboard in a real browser: headless Chromium (Debian's `chromium`, installed by
`make test`) loads `GET /` from a running reporting server holding the scripted year, waits for
the charts, and the funnel it shows matches the API; in English and in Chinese. A screenshot of
each is kept in test-artifacts/."""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from services.reporting.api import create_api
from services.reporting.projection import MIGRATIONS, project
from shared.auth import Principal, Role, issue_token
from shared.bus.consumer import apply_read_model
from shared.clock import FixedClock
from shared.settings import Settings
from tests import reporting_scenario as scenario
from tests.support import served

ARTIFACTS = Path("test-artifacts")
CHROMIUM = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", "--window-size=1400,1100")  # fmt: skip


async def chromium(url: str, *how: str) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "Chromium is missing: `make test` installs Debian's chromium package"
    with tempfile.TemporaryDirectory() as profile:
        process = await asyncio.create_subprocess_exec(
            browser, *CHROMIUM, f"--user-data-dir={profile}", "--virtual-time-budget=20000",
            *how, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()[-2000:]
    return out.decode()


async def test_the_dashboard_shows_the_apis_funnel_with_charts_in_both_languages(
    settings: Settings, schema: str, open_pool: Any
) -> None:
    pool = await open_pool(schema, MIGRATIONS)
    played = scenario.play()
    for start in range(0, len(played.envelopes), 50):
        await apply_read_model(pool, played.envelopes[start : start + 50], project)
    api = create_api(settings, pool, lambda: None, FixedClock(scenario.NOW))
    async with served(api) as port:
        token = issue_token(Principal(role=Role.ops, user="ops1"), settings.secret_for_tokens(),
                            datetime.now(UTC), timedelta(hours=1))  # fmt: skip
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            bearer = {"Authorization": f"Bearer {token}"}
            funnel = (await http.get("/v1/reports/funnel", headers=bearer)).json()
            assert (await http.get("/static/chart.umd.min.js")).status_code == 200
            assert (await http.get("/static/../api.py")).status_code == 404
        expected = {r["stage"]: r["count"] for r in funnel["rows"]}
        assert sum(expected.values()) > 0
        await asyncio.to_thread(ARTIFACTS.mkdir, exist_ok=True)
        for lang, heading in (
            ("en", "Funnel (open opportunities)"),
            ("zh", "销售漏斗（进行中的商机）"),
        ):
            url = f"http://127.0.0.1:{port}/#token={token}&from=2026-01&to=2026-05&lang={lang}"
            dom = await chromium(url, "--dump-dom")
            assert 'data-ready="true"' in dom, dom[-3000:]
            assert heading in dom
            shown = dict(re.findall(r'<tr data-stage="([A-F])"><td>[^<]*</td><td class="count">'
                                    r"(\d+)</td>", dom))  # fmt: skip
            assert {s: int(n) for s, n in shown.items()} == expected
            assert dom.count("<canvas") == 6 and 'id="forecast-revenue"' in dom
            shot = ARTIFACTS / f"dashboard-{lang}.png"
            await chromium(url, f"--screenshot={shot.resolve()}")
            assert shot.stat().st_size > 20_000  # charts drawn, not a blank page
        # Grouped by team: each team's open deals and the win rate of the period, as the API
        # answers them grouped (the selector did nothing: every report was asked ungrouped).
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            by_team = (await http.get("/v1/reports/funnel", params={"group_by": "team"},
                                      headers=bearer)).json()  # fmt: skip
            win = (await http.get("/v1/reports/win-rate", headers=bearer, params={
                "group_by": "team", "from": "2026-01-01T00:00:00",  # the reports' zone's
                "to": "2026-06-01T00:00:00"})).json()  # months, as the dashboard asks  # fmt: skip
        open_by_team: dict[str, int] = {}
        for row in by_team["rows"]:
            open_by_team[row["group"] or "–"] = (
                open_by_team.get(row["group"] or "–", 0) + row["count"]
            )
        won_by_team = {row["group"] or "–": row["won"] for row in win["rows"]}
        assert len(open_by_team) > 1 and sum(won_by_team.values()) > 0
        url = f"http://127.0.0.1:{port}/#token={token}&from=2026-01&to=2026-05&group=team"
        dom = await chromium(url, "--dump-dom")
        assert 'data-ready="true"' in dom, dom[-3000:]
        shown = re.findall(r'<tr data-group="([^"]*)"><td>[^<]*</td><td class="open">(\d+)</td>'
                           r'<td class="won">(\d+)</td>', dom)  # fmt: skip
        assert {g: int(n) for g, n, _ in shown} == {
            g: open_by_team.get(g, 0) for g in open_by_team.keys() | won_by_team.keys()
        }
        assert {g: int(w) for g, _, w in shown} == {
            g: won_by_team.get(g, 0) for g in open_by_team.keys() | won_by_team.keys()
        }
