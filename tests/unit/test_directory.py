"""The directory file: a good file loads, a bad one is refused with every problem and its path."""

import copy
import hashlib
from datetime import timedelta
from typing import TypeVar

import pytest
import yaml

from shared.directory import (
    DEMO_DIRECTORY,
    DirectoryError,
    check_directory_file,
    load_directory,
    national_phone,
    parse_duration,
)

CAF_TOKEN_HASH = hashlib.sha256(b"token-caf").hexdigest()

GOOD = {
    "timezone": "Europe/Paris",
    "sla": {"respond_within": "PT72H", "remind_after": ["PT24H", "PT48H"], "escalate_after": "PT60H"},
    "escalation_contacts": [{"name": "Coordination", "email": "coordination@example.org"}],
    "categories": [{"id": "caf", "label": "Allocations familiales (CAF)"}, {"id": "logement", "label": "Logement"}],
    "libraries": [
        {
            "id": "rouen-chatelet",
            "name": "Bibliothèque du Châtelet",
            "timezone": "Europe/Paris",
            "territory": ["76000", "76100"],
            "contacts": [{"name": "Accueil", "email": "accueil@example.org"}],
        },
        {
            "id": "drummondville",
            "name": "Bibliothèque de Drummondville",
            "timezone": "America/Toronto",
            "territory": ["j2b 1a1"],
        },
    ],
    "partners": [
        {
            "id": "caf-76",
            "name": "CAF de la Seine-Maritime",
            "categories": ["caf"],
            "territory": ["76"],
            "capacity": 40,
            "sla": {"respond_within": "PT48H"},
            "contacts": [
                {
                    "id": "caf76-ref",
                    "name": "Référent",
                    "email": "ref@example.org",
                    "phone": "02 61 91 01 01",
                    "role": "primary",
                },
                {"id": "caf76-backup", "name": "Accueil partenaires", "email": "backup@example.org", "role": "backup"},
            ],
        },
        {
            "id": "la-piaule",
            "name": "La Piaule",
            "categories": ["logement"],
            "territory": ["J2B"],
            "contacts": [
                {
                    "id": "piaule-ref",
                    "name": "Intervenante",
                    "email": "piaule@example.ca",
                    "phone": "(819) 555-0120",
                    "role": "primary",
                }
            ],
        },
    ],
    "users": [
        {"id": "desk-chatelet", "role": "front_desk", "library": "rouen-chatelet", "email": "accueil@example.org"},
        {"id": "op-caf76", "role": "partner", "partner": "caf-76", "token_sha256": CAF_TOKEN_HASH.upper()},
        {"id": "coord", "role": "ops", "email": "coordination@example.org"},
    ],
}


T = TypeVar("T")


def known(found: T | None) -> T:
    """What a directory lookup (library, partner, category...) must find."""
    assert found is not None
    return found


def write(tmp_path, data, name="directory.yaml"):
    path = tmp_path / name
    text = data if isinstance(data, str) else yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def changed(edit):
    data = copy.deepcopy(GOOD)
    edit(data)
    return data


def partner(data, i=0):
    return data["partners"][i]


def test_what_the_file_leaves_out_takes_the_documented_defaults(tmp_path):
    # No top-level time zone or SLA, a library with neither time zone nor territory, addresses on the reserved
    # .test domain (RFC 2606): a test or demo directory like this loads.
    data = changed(
        lambda d: (
            d.pop("timezone"),
            d.pop("sla"),
            d["libraries"][0].pop("timezone"),
            d["libraries"][0].pop("territory"),
            d["escalation_contacts"][0].update(email="coord@relais.test"),
        )
    )
    directory = load_directory(write(tmp_path, data))

    assert directory.timezone == "Europe/Paris"
    assert known(directory.library("rouen-chatelet")).timezone == "Europe/Paris"  # the directory's
    assert known(directory.library("drummondville")).timezone == "America/Toronto"  # its own
    assert known(directory.library("rouen-chatelet")).territory == []
    assert directory.sla.respond_within == timedelta(hours=72)
    assert directory.sla.remind_after == [timedelta(hours=24), timedelta(hours=48)]
    assert directory.sla.escalate_after == timedelta(hours=60)
    assert known(directory.partner("la-piaule")).sla == directory.sla
    assert known(directory.partner("caf-76")).sla.respond_within == timedelta(hours=48)
    assert directory.escalation_contacts[0].email == "coord@relais.test"

    in_america = changed(lambda d: (d.update(timezone="America/Toronto"), d["libraries"][0].pop("timezone")))
    assert known(load_directory(write(tmp_path, in_america)).library("rouen-chatelet")).timezone == "America/Toronto"


def test_good_file_loads_with_normalized_values(tmp_path):
    directory = load_directory(write(tmp_path, GOOD))

    caf = known(directory.partner("caf-76"))
    assert caf.contacts[0].phone == "+33261910101"
    assert known(directory.partner("la-piaule")).contacts[0].phone == "+18195550120"
    assert known(directory.library("drummondville")).territory == ["J2B1A1"]
    assert directory.users[1].token_sha256 == CAF_TOKEN_HASH
    assert known(directory.category("logement")).label == "Logement"
    assert directory.category("nope") is None and directory.partner("nope") is None
    assert directory.primary_contact(caf).id == "caf76-ref"
    assert known(directory.backup_contact("caf-76")).id == "caf76-backup"
    assert directory.backup_contact("la-piaule") is None


def test_partner_sla_is_the_override_merged_over_the_default(tmp_path):
    directory = load_directory(write(tmp_path, GOOD))

    # Only the window changed: inherited reminders and escalation keep their place in it.
    assert known(directory.partner("caf-76")).sla.respond_within == timedelta(hours=48)
    assert known(directory.partner("caf-76")).sla.remind_after == [timedelta(hours=16), timedelta(hours=32)]
    assert known(directory.partner("caf-76")).sla.escalate_after == timedelta(hours=40)
    assert known(directory.partner("la-piaule")).sla == directory.sla


def test_partner_sla_keeps_what_the_override_says(tmp_path):
    data = changed(
        lambda d: partner(d).update(sla={"respond_within": "PT96H", "remind_after": ["PT24H"], "escalate_after": None})
    )

    sla = known(load_directory(write(tmp_path, data)).partner("caf-76")).sla

    assert sla.respond_within == timedelta(hours=96)
    assert sla.remind_after == [timedelta(hours=24)]
    assert sla.escalate_after is None


def test_the_demo_directory_loads():
    assert check_directory_file(DEMO_DIRECTORY) == []
    directory = load_directory(DEMO_DIRECTORY)
    assert known(directory.partner("caf-76")).sla.respond_within == timedelta(hours=48)
    assert known(directory.library("rouen-chatelet")).territory == ["76000", "76100"]
    assert len(directory.categories) == 19


@pytest.mark.parametrize(
    "token, user_id",
    [
        ("demo-desk-chatelet", "desk-chatelet"),
        ("demo-desk-drummondville", "desk-drummondville"),
        ("demo-partner-caf76", "op-caf76"),
        ("demo-partner-cpam76", "op-cpam76"),
        ("demo-partner-piaule", "op-piaule"),
        ("demo-ops", "coord"),
        ("demo-ops ", None),
        ("wrong", None),
        ("", None),
    ],
)
def test_user_by_token(token, user_id):
    user = load_directory(DEMO_DIRECTORY).user_by_token(token)
    assert (user.id if user else None) == user_id


def test_user_by_token_compares_the_hash_case_insensitively_stored(tmp_path):
    directory = load_directory(write(tmp_path, GOOD))
    assert known(directory.user_by_token("token-caf")).id == "op-caf76"


DURATION_HINT = "write e.g. PT72H for 72 hours, P3D for 3 days, PT30M for 30 minutes"
PHONE_HINT = "write e.g. 02 35 12 34 56, 819 555 0123 or +33235123456"

BAD_FILES = [
    (
        "unknown time zone",
        lambda d: d.update(timezone="Europe/Pariss"),
        "timezone: unknown time zone 'Europe/Pariss' (use an IANA name such as Europe/Paris or America/Toronto)",
    ),
    (
        "duration garbage",
        lambda d: d["sla"].update(respond_within="72h"),
        f"sla.respond_within: not an ISO 8601 duration: '72h' ({DURATION_HINT})",
    ),
    (
        "duration as a number",
        lambda d: d["sla"].update(respond_within=72),
        f"sla.respond_within: must be an ISO 8601 duration, not 72 ({DURATION_HINT})",
    ),
    (
        "duration in months",
        lambda d: d["sla"].update(escalate_after="P1M"),
        "sla.escalate_after: 'P1M': years and months have no fixed length; use days instead (e.g. P30D)",
    ),
    (
        "reminder after the deadline",
        lambda d: d["sla"].update(remind_after=["PT24H", "PT80H"]),
        "sla.remind_after[1]: PT80H is not before respond_within PT72H",
    ),
    (
        "reminders out of order",
        lambda d: d["sla"].update(remind_after=["PT48H", "PT24H"]),
        "sla.remind_after[1]: PT24H is not after the previous reminder PT48H; list reminders in increasing order",
    ),
    (
        "escalation at the deadline",
        lambda d: d["sla"].update(escalate_after="PT72H"),
        "sla.escalate_after: PT72H is not before respond_within PT72H",
    ),
    (
        "partner reminder after the default deadline",
        lambda d: partner(d).update(sla={"remind_after": ["PT24H", "PT80H"]}),
        "partners[0].sla.remind_after[1]: PT80H is not before respond_within PT72H",
    ),
    (
        "partner escalation after its own deadline",
        lambda d: partner(d).update(sla={"respond_within": "PT48H", "escalate_after": "PT50H"}),
        "partners[0].sla.escalate_after: PT50H is not before respond_within PT48H",
    ),
    (
        "duplicate category",
        lambda d: d["categories"].append({"id": "caf", "label": "Encore la CAF"}),
        "categories[2].id: duplicate id 'caf' (already used at categories[0].id)",
    ),
    (
        "duplicate library",
        lambda d: d["libraries"][1].update(id="rouen-chatelet"),
        "libraries[1].id: duplicate id 'rouen-chatelet' (already used at libraries[0].id)",
    ),
    (
        "duplicate partner",
        lambda d: partner(d, 1).update(id="caf-76"),
        "partners[1].id: duplicate id 'caf-76' (already used at partners[0].id)",
    ),
    (
        "duplicate contact across partners",
        lambda d: partner(d, 1)["contacts"][0].update(id="caf76-ref"),
        "partners[1].contacts[0].id: duplicate id 'caf76-ref' (already used at partners[0].contacts[0].id)",
    ),
    (
        "duplicate user",
        lambda d: d["users"][2].update(id="desk-chatelet"),
        "users[2].id: duplicate id 'desk-chatelet' (already used at users[0].id)",
    ),
    (
        "unknown category",
        lambda d: partner(d, 1).update(categories=["logement", "xyz"]),
        "partners[1].categories[1]: unknown category 'xyz'",
    ),
    (
        "no primary contact",
        lambda d: partner(d)["contacts"][0].update(role="backup"),
        "partners[0].contacts: no primary contact; give one contact role: primary",
    ),
    (
        "two primary contacts",
        lambda d: partner(d)["contacts"][1].update(role="primary"),
        "partners[0].contacts[1].role: a second primary contact (contacts[0] is already primary); make this one backup",
    ),
    (
        "unknown contact role",
        lambda d: partner(d)["contacts"][1].update(role="main"),
        "partners[0].contacts[1].role: must be 'primary' or 'backup', not 'main'",
    ),
    (
        "bad phone",
        lambda d: partner(d)["contacts"][0].update(phone="12"),
        f"partners[0].contacts[0].phone: not a phone number: '12' ({PHONE_HINT})",
    ),
    (
        "phone left unquoted in YAML",
        lambda d: partner(d)["contacts"][0].update(phone=33261910101),
        "partners[0].contacts[0].phone: must be text; put 33261910101 in quotes",
    ),
    (
        "bad territory prefix",
        lambda d: partner(d).update(territory=["7600O"]),
        "partners[0].territory[0]: '7600O' is not a postal-code prefix (French e.g. 76 or 76000, "
        'Canadian e.g. H2X or H2X 1Y4, "" for everywhere)',
    ),
    (
        "empty territory",
        lambda d: partner(d).update(territory=[]),
        "partners[0].territory: must list at least one entry",
    ),
    ("capacity zero", lambda d: partner(d).update(capacity=0), "partners[0].capacity: must be at least 1"),
    (
        "capacity not a number",
        lambda d: partner(d).update(capacity="lots"),
        "partners[0].capacity: must be a whole number, not 'lots'",
    ),
    (
        "misspelt field",
        lambda d: partner(d).update(capcity=3),
        "partners[0].capcity: unknown field (misspelt? remove it or fix the name)",
    ),
    ("missing field", lambda d: partner(d).pop("name"), "partners[0].name: missing (required)"),
    (
        "bad id",
        lambda d: partner(d)["contacts"][1].update(id="caf76 backup"),
        "partners[0].contacts[1].id: 'caf76 backup' is not a valid id (letters, digits, '.', '_' "
        "and '-' only, 64 at most)",
    ),
    (
        "id longer than the services' columns",
        lambda d: partner(d, 1).update(id="p" * 65),
        f"partners[1].id: '{'p' * 65}' is not a valid id (letters, digits, '.', '_' and '-' only, 64 at most)",
    ),
    (
        "front desk without library",
        lambda d: d["users"][0].pop("library"),
        "users[0].library: missing; a front_desk user needs the id of their library",
    ),
    (
        "front desk of an unknown library",
        lambda d: d["users"][0].update(library="nowhere"),
        "users[0].library: unknown library 'nowhere'",
    ),
    (
        "partner user without partner",
        lambda d: d["users"][1].pop("partner"),
        "users[1].partner: missing; a partner user needs the id of their partner",
    ),
    (
        "partner user of an unknown partner",
        lambda d: d["users"][1].update(partner="caf-77"),
        "users[1].partner: unknown partner 'caf-77'",
    ),
    (
        "ops user tied to a library",
        lambda d: d["users"][2].update(library="rouen-chatelet"),
        "users[2].library: an ops user has no library; remove it",
    ),
    (
        "user who cannot sign in",
        lambda d: d["users"][2].pop("email"),
        "users[2]: no way to sign in; give an email or a token_sha256",
    ),
    (
        "token that is not a hash",
        lambda d: d["users"][1].update(token_sha256="demo-partner-caf76"),
        "users[1].token_sha256: must be the SHA-256 of the token: 64 hexadecimal characters",
    ),
    (
        "two users with one token",
        lambda d: d["users"][2].update(token_sha256=CAF_TOKEN_HASH),
        "users[2].token_sha256: same token as users[1]; every user needs their own token",
    ),
    (
        "unknown user role",
        lambda d: d["users"][2].update(role="admin"),
        "users[2].role: must be 'front_desk', 'partner' or 'ops', not 'admin'",
    ),
]


@pytest.mark.parametrize("edit, message", [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES])
def test_bad_file_is_refused_with_a_path_style_message(tmp_path, edit, message):
    path = write(tmp_path, changed(edit))

    assert check_directory_file(path) == [message]
    with pytest.raises(DirectoryError) as refused:
        load_directory(path)
    assert refused.value.errors == [message]


def test_bad_email_names_the_field_and_the_reason(tmp_path):
    path = write(tmp_path, changed(lambda d: partner(d)["contacts"][0].update(email="ref@")))

    [error] = check_directory_file(path)

    assert error.startswith("partners[0].contacts[0].email: not an email address: 'ref@' (")


def test_every_error_is_reported_at_once_in_file_order(tmp_path):
    def many_mistakes(d):
        d["users"][0].update(library="nowhere")
        partner(d, 1).update(categories=["xyz"])
        partner(d, 1)["contacts"][0].update(email="not-an-email")
        partner(d).update(capacity=0)
        d["sla"].update(remind_after=["PT24H", "PT99H"])
        d["categories"].append({"id": "caf", "label": "Encore"})

    errors = check_directory_file(write(tmp_path, changed(many_mistakes)))

    assert [e.split(":")[0] for e in errors] == [
        "sla.remind_after[1]",
        "categories[2].id",
        "partners[0].capacity",
        "partners[1].categories[0]",
        "partners[1].contacts[0].email",
        "users[0].library",
    ]


def test_errors_are_ordered_by_index_not_alphabetically(tmp_path):
    def edit(d):
        d["partners"] = [copy.deepcopy(partner(d, 1)) for _ in range(11)]
        for i, p in enumerate(d["partners"]):
            p["id"] = f"p{i}"
            p["contacts"][0]["id"] = f"c{i}"
        d["partners"][2]["capacity"] = 0
        d["partners"][10]["capacity"] = 0
        d["users"][1]["partner"] = "p0"

    errors = check_directory_file(write(tmp_path, changed(edit)))

    assert errors == ["partners[2].capacity: must be at least 1", "partners[10].capacity: must be at least 1"]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "timezone: Europe/Paris\nsla: [PT72H\n",
            "line 3, column 1: invalid YAML: expected ',' or ']', but got '<stream end>'",
        ),
        (
            "timezone: Europe/Paris\ntimezone: UTC\n",
            "line 2, column 1: invalid YAML: key 'timezone' appears twice in the same mapping",
        ),
        ("", "(top level): the file is empty"),
        ("- a\n- b\n", "(top level): expected a mapping (timezone:, sla:, categories:, ...), got list"),
    ],
)
def test_unreadable_yaml(tmp_path, text, message):
    assert check_directory_file(write(tmp_path, text)) == [message]


def test_missing_file(tmp_path):
    path = tmp_path / "absent.yaml"
    assert check_directory_file(path) == [f"{path}: file not found"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("PT72H", timedelta(hours=72)),
        ("P3D", timedelta(days=3)),
        ("PT30S", timedelta(seconds=30)),
        ("PT1.5S", timedelta(seconds=1.5)),
        ("PT0,5S", timedelta(seconds=0.5)),
        ("P1DT12H", timedelta(hours=36)),
        ("P1W", timedelta(weeks=1)),
        ("PT90M", timedelta(minutes=90)),
        ("pt72h", timedelta(hours=72)),
    ],
)
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "P", "PT", "P1DT", "72", "PT72", "-PT1H", "PT1H30", "P1Y", "PT0S", "3 days"])
def test_parse_duration_refuses_garbage(text):
    with pytest.raises(ValueError):
        parse_duration(text)


# --- retention, consent, jurisdictions (docs/privacy.md) ------------------------------------------------------


def test_a_directory_without_retention_or_consent_gets_the_defaults_and_each_desk_its_jurisdiction(tmp_path):
    directory = load_directory(write(tmp_path, GOOD))
    assert directory.retention.closed_needs == timedelta(days=730)
    assert directory.retention.message_bodies == timedelta(days=180)
    assert directory.retention.access_log == timedelta(days=365)
    assert directory.retention.technical_rows is None  # RELAIS_TECHNICAL_RETENTION then
    assert [(lib.id, lib.jurisdiction) for lib in directory.libraries] == [
        ("rouen-chatelet", "FR"),
        ("drummondville", "CA-QC"),
    ]
    assert known(directory.consent_text("fr")).version == "relais-fr-1"


def test_the_demo_directory_keeps_quebec_data_for_its_own_periods():
    demo = load_directory(DEMO_DIRECTORY)
    assert demo.retention.periods("FR").closed_needs == timedelta(days=730)
    assert demo.retention.periods("CA-QC").closed_needs == timedelta(days=365)
    assert demo.retention.periods("CA-QC").message_bodies == timedelta(days=90)
    assert demo.retention.periods("CA-QC").access_log == timedelta(days=365)  # the block's own value
    assert known(demo.library("drummondville")).jurisdiction == "CA-QC"
    assert known(demo.library("rouen-chatelet")).jurisdiction == "FR"
    assert demo.privacy_contact is not None


@pytest.mark.parametrize(
    "retention, message",
    [
        ({"closed_needs": "two years"}, "retention.closed_needs: not an ISO 8601 duration: 'two years' (write e.g."),
        ({"message_bodies": "P6M"}, "retention.message_bodies: 'P6M': years and months have no fixed length; use days"),
        ({"access_log": "P0D"}, "retention.access_log: 'P0D' must be longer than zero"),
        ({"jurisdictions": {"CA-QC": {"open_needs": "P2Y"}}}, "retention.jurisdictions.CA-QC.open_needs: 'P2Y': years"),
        ({"jurisdictions": {"BE": {}}}, "retention.jurisdictions.BE"),
        ({"closed_need": "P30D"}, "retention.closed_need: unknown field (misspelt? remove it or fix the name)"),
        ({"purge_at": "25:00"}, "retention.purge_at"),
    ],
)
def test_a_bad_retention_names_the_key_and_says_what_to_fix(tmp_path, retention, message):
    errors = check_directory_file(write(tmp_path, {**GOOD, "retention": retention}))
    assert any(e.startswith(message) for e in errors), errors


def test_consent_texts_need_unique_versions_and_one_in_each_desk_language(tmp_path):
    text = {"version": "fr-1", "language": "fr", "handoff": "Transmission", "messages": "Messages"}
    data: dict = copy.deepcopy(GOOD)
    data["consent"] = [text, text]
    data["libraries"][1]["language"] = "en"
    errors = check_directory_file(write(tmp_path, data))
    assert (
        "consent[1].version: duplicate version 'fr-1' (already consent[0]); give each text its own version id" in errors
    )
    assert "libraries[1].language: no consent text in 'en'; add one to consent with language: en" in errors


def test_a_directory_without_deployment_gets_the_neutral_look_named_relais(tmp_path):
    deployment = load_directory(write(tmp_path, GOOD)).deployment
    assert (deployment.name, deployment.theme, deployment.state_service) == ("Relais", "neutral", False)
    state = {"name": "France Services de Seine-Maritime", "theme": "dsfr", "state_service": True}
    loaded = load_directory(write(tmp_path, {**GOOD, "deployment": state})).deployment
    assert loaded.model_dump() == state


@pytest.mark.parametrize(
    "deployment, message",
    [
        ({"theme": "gouv"}, "deployment.theme: must be 'dsfr' or 'neutral', not 'gouv'"),
        ({"theme": "dsfr", "state_service": "oui"}, "deployment.state_service: must be true or false, not 'oui'"),
        ({"name": " "}, "deployment.name: must not be empty"),
        ({"state_service": True}, "deployment: state_service: true shows the République française block, which only"),
        ({"logo": "x.png"}, "deployment.logo: unknown field"),
    ],
)
def test_a_bad_deployment_block_says_what_to_fix(tmp_path, deployment, message):
    errors = check_directory_file(write(tmp_path, {**GOOD, "deployment": deployment}))
    assert any(e.startswith(message) for e in errors), errors


@pytest.mark.parametrize(
    "e164, country, shown",
    [
        ("+33612345678", "FR", "06 12 34 56 78"),
        ("+18195550101", "CA", "819 555-0101"),
        ("+18195550101", "FR", "+1 819-555-0101"),  # another country's number: in international form
        ("+33235123456", "CA", "+33 2 35 12 34 56"),
        ("+18195550101", None, "819 555-0101"),  # no library: as its own country writes it
        (None, "FR", ""),
    ],
)
def test_phones_are_shown_as_the_librarys_country_writes_them(e164, country, shown):
    assert national_phone(e164, country) == shown


def test_a_desks_country_follows_its_jurisdiction():
    demo = load_directory(DEMO_DIRECTORY)
    assert known(demo.library("rouen-chatelet")).country == "FR"
    assert known(demo.library("drummondville")).country == "CA"


def test_who_acted_reads_as_names_from_the_directory_never_as_ids(tmp_path):
    from shared.pages import actor_fr
    from shared.testing import directory_data

    directory = load_directory(write(tmp_path, directory_data()))
    assert actor_fr(directory, "op-caf") == "CAF de la Seine-Maritime"
    assert actor_fr(directory, "desk") == "Bibliothèque du Châtelet"
    assert actor_fr(directory, "ops") == "la coordination"
    assert actor_fr(directory, "ops", with_address=True) == "la coordination (ops@coordination.test.example)"
    assert actor_fr(directory, "system") == "Relais"
    assert actor_fr(directory, "link:caf-76") == "CAF de la Seine-Maritime, par le lien reçu par e-mail"
    assert actor_fr(directory, "op-gone") == "un compte qui n'est plus dans l'annuaire"
