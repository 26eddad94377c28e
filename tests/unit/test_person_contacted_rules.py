"""The rules of the question "were you contacted?" (issue 16, part 3): reading OUI/NON, when it goes, the figures."""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.notifications.domain import contact_answer, is_stop_reply
from services.referral import dashboard, domain, views
from shared.directory import DirectoryError, parse_directory
from shared.testing import directory_data


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("OUI", "yes"),
        ("oui", "yes"),
        ("Oui.", "yes"),
        (" Oui, merci beaucoup", "yes"),
        ("OUÍ!", "yes"),
        ("non", "no"),
        ("Non merci", "no"),
        ("NON !", "no"),
        ("«non»", "no"),
        ("Yes", "yes"),  # the English question's
        ("no thanks", "no"),
        ("Nonante", None),
        ("peut-être", None),
        ("", None),
        ("STOP", None),
    ],
)
def test_oui_and_non_are_read_whatever_their_case_accents_and_punctuation(text, answer):
    assert contact_answer(text) == answer


def test_stop_stays_stop():
    assert is_stop_reply("STOP") and contact_answer("STOP") is None


def test_the_question_goes_three_days_after_the_first_answer_unless_the_partner_says_otherwise():
    data = directory_data()
    data["partners"][1]["contact_question_after"] = "P5D"
    directory = parse_directory(data)
    at = datetime(2026, 12, 1, 9, tzinfo=UTC)
    default, five = directory.partners[0], directory.partners[1]
    assert domain.contact_question_due(at, default) == at + timedelta(days=3)
    assert domain.contact_question_due(at, five) == at + timedelta(days=5)


def test_a_bad_contact_question_after_is_named_with_its_path():
    data = directory_data()
    data["partners"][0]["contact_question_after"] = "3 jours"
    with pytest.raises(DirectoryError) as refused:
        parse_directory(data)
    problem = "partners[0].contact_question_after: not an ISO 8601 duration"
    assert any(e.startswith(problem) for e in refused.value.errors)


@pytest.mark.parametrize(
    ("status", "by_desk", "asked", "erased", "goes"),
    [
        ("accepted", False, False, False, True),
        ("responded", False, False, False, True),
        ("closed", False, False, False, True),  # the partner closed it: the person is still asked
        ("closed", True, False, False, False),  # the desk closed it: the person no longer needs help
        ("declined", False, False, False, False),
        ("cancelled", False, False, False, False),
        ("accepted", False, True, False, False),  # never a second question
        ("accepted", False, False, True, False),
    ],
)
def test_the_question_goes_once_and_only_while_it_makes_sense(status, by_desk, asked, erased, goes):
    asked_at = datetime(2026, 12, 1, tzinfo=UTC) if asked else None
    assert domain.contact_question_goes(status, by_desk, asked_at, erased) is goes


def test_only_the_first_answer_to_a_question_asked_counts():
    asked = datetime(2026, 12, 1, tzinfo=UTC)
    assert domain.person_answer_counts(asked, None)
    assert not domain.person_answer_counts(asked, "no")
    assert not domain.person_answer_counts(None, None)


def test_the_rate_is_yes_over_yes_no_and_questions_unanswered_after_a_week():
    # Which unanswered questions count (a week old) is the database's count: tests/integration/test_dashboard.py.
    figures = dashboard.contact_figures(views.ContactCounts(asked=5, yes=2, no=1, no_answer=1))
    assert (figures.asked, figures.yes, figures.no, figures.no_answer) == (5, 2, 1, 1)
    assert figures.confirmed_share == 0.5
    assert dashboard.contact_figures(None).confirmed_share is None
    assert dashboard.total_contact([figures, figures]).confirmed_share == 0.5


@pytest.mark.parametrize("language", ["fr", "en"])
def test_the_question_renders_in_the_persons_language_with_its_two_links_and_no_summary(language):
    from services.notifications.render import render

    links = {"link_yes": "https://relais.example/contact/oui", "link_no": "https://relais.example/contact/non"}
    facts: dict[str, Any] = dict(
        links,
        partner="CAF de la Seine-Maritime",
        library="Bibliothèque du Châtelet",
        desk_email="accueil@example.org",
        desk_phone=None,
        country="FR",
        deployment="Relais",
        respond_by=None,
        timezone="Europe/Paris",
        recorded_at="2026-12-01T10:15:00+01:00",
    )
    email = render("contact_question", "email", language, **facts)
    sms = render("contact_question", "sms", language, **facts)
    greeting, ask = ("Bonjour", "OUI ou NON") if language == "fr" else ("Hello", "YES or NO")
    assert email.text.startswith(greeting) and email.html and greeting in email.html
    assert links["link_yes"] in email.html and links["link_no"] in email.html
    assert ask in sms.text and "STOP" in sms.text and "http" not in sms.text
