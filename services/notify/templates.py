"""Notification texts in English and Simplified Chinese, chosen by the recipient's locale; each
names the opportunity, its stage, how overdue, and links to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.settings import Rules

Locale = Literal["en", "zh-CN"]

SUBJECTS: dict[str, dict[str, str]] = {
    "en": {
        "follow_up_due": "Follow-up due: {title} (stage {stage} {stage_name})",
        "escalation": "Escalation: {title} is {overdue} day(s) overdue for follow-up",
        "stale_warning": "No activity for {idle} days: {title}",
        "expected_close_passed": "Expected close date passed: {title}",
        "recycled": "Returned to the pool: {title}",
        "weekly_digest": "Weekly pipeline digest for team {team}: {count} item(s)",
    },
    "zh-CN": {
        "follow_up_due": "跟进到期：{title}（阶段 {stage} {stage_name}）",
        "escalation": "升级提醒：{title} 已逾期 {overdue} 天未跟进",
        "stale_warning": "{idle} 天无进展：{title}",
        "expected_close_passed": "预计成交日期已过：{title}",
        "recycled": "商机已回收至公海：{title}",
        "weekly_digest": "{team} 团队销售周报：{count} 项需关注",
    },
}

BODIES: dict[str, dict[str, str]] = {
    "en": {
        "follow_up_due": "{company} — {title} is in stage {stage} ({stage_name}). A follow-up "
        "is due {due}{overdue_text}. Log it here: {link}",
        "escalation": "{company} — {title} (stage {stage} {stage_name}, owner {owner}) has had "
        "no follow-up since {due}: {overdue} day(s) overdue. Escalated along {chain}. {link}",
        "stale_warning": "{company} — {title} (stage {stage} {stage_name}, owner {owner}) has "
        "had no activity since {last_activity}. It is recycled to the pool after "
        "{recycle_days} idle days. {link}",
        "expected_close_passed": "{company} — {title} (stage {stage} {stage_name}) was expected "
        "to close on {expected_close} and is still open. Update the date or the outcome: {link}",
        "recycled": "{company} — {title} (stage {stage} {stage_name}) was idle and has been "
        "returned to the pool of team {team}. Reassign it: {link}",
        "weekly_digest": "Overdue follow-ups (missed follow-up warning):\n{overdue_lines}\n\n"
        "Important and major deals without progress this week:\n{quiet_lines}",
    },
    "zh-CN": {
        "follow_up_due": "{company} — {title} 处于阶段 {stage}（{stage_name}），应于 {due} 前"
        "完成跟进{overdue_text}。请在此记录：{link}",
        "escalation": "{company} — {title}（阶段 {stage} {stage_name}，负责人 {owner}）自 {due} "
        "起未跟进，已逾期 {overdue} 天。升级路径：{chain}。{link}",
        "stale_warning": "{company} — {title}（阶段 {stage} {stage_name}，负责人 {owner}）自 "
        "{last_activity} 起无任何进展，闲置 {recycle_days} 天后将回收至公海。{link}",
        "expected_close_passed": "{company} — {title}（阶段 {stage} {stage_name}）预计于 "
        "{expected_close} 成交，目前仍未关闭。请更新日期或结果：{link}",
        "recycled": "{company} — {title}（阶段 {stage} {stage_name}）长期无进展，已回收至 {team} "
        "团队公海，请重新分配：{link}",
        "weekly_digest": "漏跟进预警：\n{overdue_lines}\n\n"
        "本周无进展的重要/重大商机：\n{quiet_lines}",
    },
}

OVERDUE_TEXT = {"en": " ({n} day(s) overdue)", "zh-CN": "（已逾期 {n} 天）"}
NONE_TEXT = {"en": "  (none)", "zh-CN": "  （无）"}
MORE_TEXT = {"en": "  … and {n} more", "zh-CN": "  ……另有 {n} 项"}
LINE = {
    "en": "  - {title} (stage {stage}, owner {owner}, tier {tier}){extra}",
    "zh-CN": "  - {title}（阶段 {stage}，负责人 {owner}，级别 {tier}）{extra}",
}


@dataclass(frozen=True)
class Text:
    subject: str
    body: str


def stage_name(stage: str, locale: Locale, rules: Rules) -> str:
    rule = rules.stages.get(stage)
    if rule is None:
        return stage
    return rule.name_zh if locale == "zh-CN" else rule.name


def render(kind: str, locale: Locale, rules: Rules, **values: object) -> Text:
    stage = str(values.get("stage", ""))
    values.setdefault("stage_name", stage_name(stage, locale, rules))
    overdue = values.get("overdue") or 0
    values.setdefault("overdue_text", OVERDUE_TEXT[locale].format(n=overdue) if overdue else "")
    values.setdefault("owner", "-")
    subject = SUBJECTS[locale][kind].format(**values)
    # One line: a company name may hold a line break, which no mail header can carry.
    subject = " ".join(subject.splitlines())
    return Text(subject, BODIES[locale][kind].format(**values))


def digest_lines(locale: Locale, lines: list[dict[str, object]], more: int = 0) -> str:
    """The lines shown, and how many more there are that a digest leaves out."""
    if not lines and not more:
        return NONE_TEXT[locale]
    shown = [LINE[locale].format(**line) for line in lines]
    return "\n".join([*shown, MORE_TEXT[locale].format(n=more)] if more else shown)
