"""Routing: which partner gets a need, by the contract's rule, and the reason a coordinator reads."""

import pytest

from services.referral.domain import normalize_postal_code, route_need
from shared.directory import parse_directory


def a_partner(id, name, categories, territory, capacity=None):
    # The backup comes first in the file so that a test can see the primary being chosen.
    return {
        "id": id,
        "name": name,
        "categories": categories,
        "territory": territory,
        "capacity": capacity,
        "contacts": [
            {"id": f"{id}-backup", "name": "Accueil", "email": f"backup@{id}.example.org", "role": "backup"},
            {"id": f"{id}-ref", "name": "Référent", "email": f"ref@{id}.example.org", "role": "primary"},
        ],
    }


DIRECTORY = parse_directory(
    {
        "timezone": "Europe/Paris",
        "sla": {"respond_within": "PT72H"},
        "categories": [
            {"id": "caf", "label": "Allocations familiales (CAF)"},
            {"id": "logement", "label": "Logement"},
            {"id": "numerique", "label": "Aide au numérique"},
        ],
        "libraries": [
            {
                "id": "rouen-chatelet",
                "name": "Bibliothèque du Châtelet",
                "timezone": "Europe/Paris",
                "territory": ["76000", "76100"],
            },
            {
                "id": "bus-caux",
                "name": "Bus France Services",
                "timezone": "Europe/Paris",
                "territory": ["76560", "76460"],
            },
            {
                "id": "drummondville",
                "name": "Bibliothèque de Drummondville",
                "timezone": "America/Toronto",
                "territory": ["J2B"],
            },
            {"id": "sans-territoire", "name": "Point numérique"},  # no territory (and the directory's time zone)
        ],
        "partners": [
            a_partner("caf-national", "CAF plateforme nationale", ["caf"], [""]),
            a_partner("caf-76", "CAF de la Seine-Maritime", ["caf"], ["76"], capacity=40),
            a_partner("caf-rouen", "CAF Rouen", ["caf"], ["76000", "76100"], capacity=40),
            a_partner("caf-dieppe", "CAF Dieppe", ["caf"], ["76"]),
            a_partner("log-b", "Logement B", ["logement"], ["76"]),
            a_partner("log-a", "Logement A", ["logement"], ["76"]),
            a_partner("la-piaule", "La Piaule", ["logement"], ["J2B", "j2c"]),
        ],
        "users": [{"id": "coord", "role": "ops", "email": "coord@example.org"}],
    }
)


def route(category, postal_code, library_id="rouen-chatelet", open_referrals=None, **kwargs):
    return route_need(
        DIRECTORY,
        category=category,
        postal_code=postal_code,
        library_id=library_id,
        open_referrals=lambda partner_id: (open_referrals or {}).get(partner_id, 0),
        **kwargs,
    )


CASES = [
    # (what it shows, arguments of route(), the partner expected)
    ("the category filters partners", dict(category="logement", postal_code="76000"), "log-a"),
    ("the longest prefix wins", dict(category="caf", postal_code="76000"), "caf-rouen"),
    ("a department beats everywhere", dict(category="caf", postal_code="76190"), "caf-76"),
    ('"" covers everywhere', dict(category="caf", postal_code="H2X 1Y4"), "caf-national"),
    (
        "no postal code: the library's first prefix",
        dict(category="caf", postal_code=None, library_id="rouen-chatelet"),
        "caf-rouen",
    ),
    (
        "no postal code, a library without territory: partners covering everywhere",
        dict(category="caf", postal_code=None, library_id="sans-territoire"),
        "caf-national",
    ),
    (
        "blank postal code: the library's first prefix",
        dict(category="caf", postal_code="  ", library_id="bus-caux"),
        "caf-76",
    ),
    (
        "a partner at capacity is skipped",
        dict(category="caf", postal_code="76000", open_referrals={"caf-rouen": 40}),
        "caf-76",
    ),
    (
        "over capacity is skipped too",
        dict(category="caf", postal_code="76000", open_referrals={"caf-rouen": 41, "caf-76": 40}),
        "caf-dieppe",
    ),
    (
        "under capacity is fine",
        dict(category="caf", postal_code="76000", open_referrals={"caf-rouen": 39}),
        "caf-rouen",
    ),
    (
        "no capacity means no limit",
        dict(category="caf", postal_code="76190", open_referrals={"caf-76": 40, "caf-dieppe": 500}),
        "caf-dieppe",
    ),
    (
        "a tie goes to the fewest open referrals",
        dict(category="logement", postal_code="76000", open_referrals={"log-a": 5, "log-b": 2}),
        "log-b",
    ),
    (
        "then to the partner id",
        dict(category="logement", postal_code="76000", open_referrals={"log-a": 2, "log-b": 2}),
        "log-a",
    ),
    (
        "a partner that declined is not offered the need again",
        dict(category="caf", postal_code="76000", excluded_partner_ids={"caf-rouen"}),
        "caf-76",
    ),
    (
        "a paused partner is not offered the need",
        dict(category="caf", postal_code="76000", paused_partner_ids={"caf-rouen", "caf-76"}),
        "caf-dieppe",
    ),
    (
        "Canadian code with a space, lower case",
        dict(category="logement", postal_code=" j2b 1a1 ", library_id="drummondville"),
        "la-piaule",
    ),
    (
        "Canadian code written solid",
        dict(category="logement", postal_code="J2C1A1", library_id="drummondville"),
        "la-piaule",
    ),
    (
        "Canadian desk, no postal code",
        dict(category="logement", postal_code=None, library_id="drummondville"),
        "la-piaule",
    ),
    ("no partner for the category", dict(category="numerique", postal_code="76000"), None),
    ("no partner on the territory", dict(category="logement", postal_code="H2X 1Y4"), None),
    (
        "every candidate declined",
        dict(category="logement", postal_code="76000", excluded_partner_ids={"log-a", "log-b"}),
        None,
    ),
    ("unknown category", dict(category="xyz", postal_code="76000"), None),
]


@pytest.mark.parametrize("arguments, partner_id", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_route_need(arguments, partner_id):
    decision = route(**arguments)

    if partner_id is None:
        assert decision.partner is None and decision.contact is None
        assert decision.reason.startswith("Aucun partenaire ne prend la thématique")
    else:
        assert decision.partner.id == partner_id
        assert decision.contact.id == f"{partner_id}-ref"  # the primary, not the first listed


def test_reason_names_the_winner_and_why_the_others_lost():
    decision = route(
        "caf", "76000", open_referrals={"caf-rouen": 40, "caf-dieppe": 3}, excluded_partner_ids={"caf-national"}
    )

    assert decision.reason == (
        "Thématique « Allocations familiales (CAF) », code postal 76000 : préfixe « 76 » de "
        "CAF de la Seine-Maritime ; à préfixe égal, le moins d'orientations en cours (0) ; "
        "écartés : CAF Dieppe (plus d'orientations en cours : 3), CAF plateforme nationale (a déjà "
        "décliné), CAF Rouen (capacité atteinte 40/40)."
    )


def test_reason_says_the_longest_prefix_won():
    decision = route("caf", "76000", open_referrals={"caf-rouen": 40}, excluded_partner_ids={"caf-dieppe"})

    assert decision.reason == (
        "Thématique « Allocations familiales (CAF) », code postal 76000 : préfixe « 76 » de "
        "CAF de la Seine-Maritime (le plus long) ; écartés : CAF plateforme nationale (préfixe "
        "plus court), CAF Rouen (capacité atteinte 40/40), CAF Dieppe (a déjà décliné)."
    )


def test_reason_for_a_tie_settled_by_id():
    assert route("logement", "76000").reason == (
        "Thématique « Logement », code postal 76000 : préfixe « 76 » de Logement A ; à égalité parfaite, "
        "choisi selon un ordre fixe ; écartés : Logement B (à égalité parfaite, venait après dans cet "
        "ordre)."
    )


def test_reason_for_everywhere_and_for_a_desk_without_postal_code():
    assert route("caf", "h2x1y4").reason == (
        "Thématique « Allocations familiales (CAF) », code postal H2X 1Y4 : CAF plateforme "
        "nationale (couvre tout le territoire)."
    )
    assert route("logement", None, library_id="drummondville").reason == (
        "Thématique « Logement », territoire « J2B » de Bibliothèque de Drummondville (pas de "
        "code postal) : préfixe « J2B » de La Piaule."
    )


@pytest.mark.parametrize(
    "arguments, reason",
    [
        (
            dict(category="numerique", postal_code="76000"),
            "Aucun partenaire ne prend la thématique « Aide au numérique » pour le code postal 76000 : "
            "aucun partenaire de l'annuaire ne traite cette thématique.",
        ),
        (
            dict(category="logement", postal_code="H2X 1Y4"),
            "Aucun partenaire ne prend la thématique « Logement » pour le code postal H2X 1Y4 : aucun "
            "des partenaires qui la traitent ne couvre ce territoire (Logement B, Logement A, La Piaule).",
        ),
        (
            dict(
                category="logement",
                postal_code="76000",
                excluded_partner_ids={"log-a"},
                open_referrals={"log-b": 2},
                paused_partner_ids={"log-b"},
            ),
            "Aucun partenaire ne prend la thématique « Logement » pour le code postal 76000 ; écartés : "
            "Logement B (en pause), Logement A (a déjà décliné).",
        ),
        (
            dict(category="xyz", postal_code="76000"),
            "Aucun partenaire ne prend la thématique « xyz » pour le code postal 76000 : thématique "
            "inconnue de l'annuaire.",
        ),
    ],
)
def test_reason_when_nobody_can_take_the_need(arguments, reason):
    assert route(**arguments).reason == reason


def test_unknown_library_is_a_programming_error():
    with pytest.raises(LookupError):
        route("caf", None, library_id="nowhere")


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("76000", "76000"),
        (" 76 000 ", "76000"),
        ("H2X 1Y4", "H2X1Y4"),
        ("h2x1y4", "H2X1Y4"),
        ("", ""),
    ],
)
def test_normalize_postal_code(raw, normalized):
    assert normalize_postal_code(raw) == normalized
